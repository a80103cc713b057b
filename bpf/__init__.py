"""The BPF C sources, shipped as package data (agentwarden.bpf)."""
