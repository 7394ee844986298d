"""The pretrained networks: the registry, the one factory that builds and cuts them, weights, BatchNorm
folding, pooling, costs."""
