"""Prometheus metrics under vLLM's names, so existing dashboards, alerts and autoscalers work unchanged.

Engine-wide gauges and counters are read from ``LLMEngine.stats()`` at scrape time (a collector, so
they can never drift from the engine); per-request histograms are observed when a request finishes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from flotilla.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector(Collector):
    def __init__(self, model_name: str, engine: Callable[[], Any]) -> None:
        self.model_name = model_name
        self.engine = engine  # returns the LLMEngine, or None while loading

    def collect(self) -> Iterator[Any]:
        engine = self.engine()
        if engine is None:
            return
        s = engine.stats()
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("vllm:num_requests_swapped", "Requests swapped out to host memory.", s.num_swapped)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", s.kv_cache_usage)
        yield gauge("vllm:gpu_cache_usage_perc", "Deprecated alias of vllm:kv_cache_usage_perc.", s.kv_cache_usage)
        yield counter("vllm:num_preemptions", "Cumulative preemptions.", s.num_preemptions)
        yield counter("vllm:prefix_cache_queries", "Prefix-cache lookups, in tokens.", s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.", s.prefix_cache_hits)
        yield counter("vllm:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens)
        yield counter("vllm:generation_tokens", "Generation tokens produced.", s.generation_tokens)
        yield counter("flotilla:request_errors", "Requests stopped because their own processing raised "
                      "(each failed alone; the engine went on).", s.request_errors)
        if s.max_lora:  # vLLM's: the adapters in use, as labels; the value is when it was read
            lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests.",
                                     labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            lora.add_metric([str(s.max_lora), ",".join(s.waiting_lora_adapters), ",".join(s.running_lora_adapters)],
                            time.time())
            yield lora
        facts = {
            "model_name": self.model_name,
            "block_size": str(engine.cache_config.block_size),
            "num_gpu_blocks": str(engine.cache_config.num_blocks),
            "max_model_len": str(engine.max_model_len),
            "model_load_seconds": f"{engine.model_load_seconds:.2f}",
            "dtype": str(engine.dtype).removeprefix("torch."),
            "device": engine.device.type,
        }
        cache_info = InfoMetricFamily("vllm:cache_config", "KV-cache configuration.")
        cache_info.add_metric([], {k: facts[k] for k in ("block_size", "num_gpu_blocks")})
        yield cache_info
        info = GaugeMetricFamily("flotilla:engine_info", "Engine facts (value is always 1).", labels=list(facts))
        info.add_metric(list(facts.values()), 1.0)
        yield info


class ServerMetrics:
    def __init__(self, model_name: str, engine: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(model_name, engine))
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.success = Counter("vllm:request_success", "Finished requests by reason.",
                               labels + ["finished_reason"], registry=self.registry)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = hist("vllm:time_per_output_token_seconds", "Mean time per output token after the first.",
                         _LATENCY_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Time waiting before first scheduled.",
                          _LATENCY_BUCKETS)
        self.prompt_tokens = hist("vllm:request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS)
        self.generation_tokens = hist("vllm:request_generation_tokens", "Generated tokens per request.",
                                      _TOKEN_BUCKETS)

    def observe_finished(self, out: RequestOutput) -> None:
        m, name = out.metrics, self.model_name
        for c in out.outputs:
            self.success.labels(name, c.finish_reason or "abort").inc()
        self.prompt_tokens.labels(name).observe(len(out.prompt_token_ids))
        generated = sum(len(c.token_ids) for c in out.outputs)
        self.generation_tokens.labels(name).observe(generated)
        if m is None:
            return
        end = m.finished_time or m.last_token_time
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(m.first_token_time - m.arrival_time)
            if end is not None and generated > 1:
                self.tpot.labels(name).observe((m.last_token_time - m.first_token_time) / (generated - 1))
        if end is not None:
            self.e2e.labels(name).observe(end - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.labels(name).observe(m.first_scheduled_time - m.arrival_time)
