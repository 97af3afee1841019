"""Lifeline's wire contract: subjects, headers and message types. No I/O here."""

from schemas import subjects
from schemas.wire import (
    ERROR_KINDS,
    Attempt,
    AuditEvent,
    ChatMessage,
    CompletionReply,
    CompletionRequest,
    ErrorInfo,
    ProviderFailure,
    ProviderOk,
    ProviderReply,
    ProviderRequest,
    Usage,
)

__all__ = [
    "ERROR_KINDS",
    "Attempt",
    "AuditEvent",
    "ChatMessage",
    "CompletionReply",
    "CompletionRequest",
    "ErrorInfo",
    "ProviderFailure",
    "ProviderOk",
    "ProviderReply",
    "ProviderRequest",
    "Usage",
    "subjects",
]
