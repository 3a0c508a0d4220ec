"""Chat models on the agent: llama.cpp's server built once (build.py), the GGUF files and what they
need (models.py), the loaded servers (servers.py), and one streamed chat (stream.py). The runner
that offers them is agent/runners/chat.py."""
