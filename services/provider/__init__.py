"""The LLM-provider service: talks to model runtimes (adapters come with the LLM path)."""
