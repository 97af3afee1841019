"""The ten-line plug-in (README: Write your own provider), with every optional part.

[providers.mine]
kind = "python"
class = "workers.examples.echo_model:EchoModel"
model = "echo-1"
settings = { prefix = "you said: " }
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec

from workers.plugin import Answer, Model, ModelError, ProviderRequest, Usage


class EchoModel(Model):
    """Answers with the last user message, after its prefix."""

    class Settings(msgspec.Struct, forbid_unknown_fields=True):
        prefix: str = ""
        word_delay_s: float = 0.0  # between streamed words, to watch them arrive
        # How long each call takes, as a real model's does: to watch a deadline or a cancel
        # cut one short (the runtime stops waiting; this thread sleeps on, then is free).
        delay_s: float = 0.0

    def call(self, request: ProviderRequest) -> Answer:  # runs in a thread: it may block
        time.sleep(self.settings.delay_s)
        text = request.messages[-1].text
        if text == "overloaded":  # how a model reports a failure the dispatcher falls back on
            raise ModelError("rate_limit", "echo model is busy", retry_after_s=1)
        answer = self.settings.prefix + text
        return Answer(text=answer, usage=Usage(len(text.split()), len(answer.split())))

    def stream(self, request: ProviderRequest) -> Iterator[str]:  # optional
        for i, word in enumerate(self.call(request).text.split(" ")):
            time.sleep(self.settings.word_delay_s)
            yield word if i == 0 else " " + word

    def identifying_params(self) -> dict[str, str]:  # optional
        return {"prefix": self.settings.prefix}
