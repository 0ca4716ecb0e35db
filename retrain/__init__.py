"""The retrain service's client side: the SDK (retrain.client) and the `retrain` command (retrain.cli)."""
