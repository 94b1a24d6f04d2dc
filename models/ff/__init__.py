"""Feed-forward learning-rule family: deep pre-LN MLP, rules, metrics, tasks, calibration."""
