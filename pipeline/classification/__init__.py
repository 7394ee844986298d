"""Stage two: classifiers on a store's taps (classify) and the linear probe on every tap (sweep)."""
