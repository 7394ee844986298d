"""New images through a model folder, decoded and run as its store's manifest says."""
