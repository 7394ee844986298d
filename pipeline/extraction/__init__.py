"""Stage one: pooled activations of named layers into a feature store, computed in shards by an engine."""
