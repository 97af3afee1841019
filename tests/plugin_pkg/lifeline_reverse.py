"""An installed plug-in: answers with the last user message reversed (async, no streaming)."""

import msgspec


class Reverse:  # no base class needed: `call` is all Lifeline looks for
    class Settings(msgspec.Struct, forbid_unknown_fields=True):
        upper: bool = False

    def __init__(self, settings: "Reverse.Settings") -> None:
        self.settings = settings

    async def call(self, request):
        text = request.messages[-1].text[::-1]
        return text.upper() if self.settings.upper else text
