"""HTTP handlers, one module per family: public generation APIs, status and artifacts, agents."""
