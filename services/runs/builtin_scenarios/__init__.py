"""Built-in scenarios shipped with Dovecote (one folder each: manifest.json, prompt.md)."""
