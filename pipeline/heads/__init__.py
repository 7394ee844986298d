"""What trains on stored features (stage two's estimators, all scikit-learn estimators) and folds into a network."""
