"""Neural network modules: speech encoders, mesh encoder, fusion, regression head, baselines."""
