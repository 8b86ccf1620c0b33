"""Flotilla's inference engine. Public names follow vLLM's so scripts migrate unchanged."""

from flotilla.engine.async_engine import AsyncLLMEngine
from flotilla.engine.config import EngineArgs
from flotilla.engine.llm import LLM
from flotilla.engine.llm_engine import LLMEngine
from flotilla.engine.models.registry import ModelRegistry
from flotilla.engine.outputs import (
    CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob, RequestMetrics, RequestOutput)
from flotilla.engine.pooling import PoolingParams
from flotilla.engine.sampling_params import RequestOutputKind, SamplingParams
from flotilla.engine.structured_output import GuidedDecodingParams, StructuredOutputsParams

__all__ = [
    "AsyncLLMEngine",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EngineArgs",
    "GuidedDecodingParams",
    "LLM",
    "LLMEngine",
    "ModelRegistry",
    "Logprob",
    "PoolingParams",
    "RequestMetrics",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
]
