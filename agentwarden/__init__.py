"""agentwarden: see and govern every exec and file open of AI agents."""
__version__ = "0.1.0"
