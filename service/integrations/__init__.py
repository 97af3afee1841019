"""Lifeline as a model of other frameworks: a LangChain chat model (`langchain`) and a Haystack
chat generator (`haystack`), each an optional extra (`pip install 'lifeline[langchain]'`).
Both talk to Lifeline through service.client, from any thread or event loop (`bridge`)."""
