"""Client daemon: connects out, trains locally with mixed precision, uploads compressed updates."""
