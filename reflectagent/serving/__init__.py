"""Serving a local model: model folders, what they were made from and what they are called (``sources``),
GGUFs converted and LoRA adapters merged (``convert``), named presets on PyPI (``presets``), the folder
for a name (``models``), vLLM's server as a child process (``server``), the embedded server found or
started (``embedded``), token counts as the served model makes them (``tokens``), and a server on this machine
asked without the environment's proxy (``loopback``)."""
