"""Lifeline's wire contract: subjects, headers, message types and error kinds. No I/O here."""

from schemas import errors, subjects
from schemas.errors import ProviderError
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
    "ProviderError",
    "ProviderFailure",
    "ProviderOk",
    "ProviderReply",
    "ProviderRequest",
    "Usage",
    "errors",
    "subjects",
]
