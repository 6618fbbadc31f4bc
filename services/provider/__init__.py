"""The LLM-provider service: executes a call against its upstreams (adapters in
`shared.infra.upstreams`) and node targets (`nodes.py`), with retries and fallback."""
