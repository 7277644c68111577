"""Calling a backend: settings (``config``), a backend name resolved to an LM (``backends``), a pool of
replicas (``pool``), the client for vLLM servers (``vllm_client``), the JSON adapter (``adapter``), the
judgment cache (``cache``), the one event loop (``concurrency``), and the one cached, accounted call a
judge makes (``steps``)."""
