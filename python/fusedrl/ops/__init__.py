"""torch.library custom ops (one file per primitive) and the backend launchers behind them."""
