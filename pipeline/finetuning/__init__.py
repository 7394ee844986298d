"""Stage three: fine-tuning end to end from stage two's probe, and its report against stage two."""
