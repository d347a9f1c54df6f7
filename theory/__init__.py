"""The theory lab: SPPO on small preference games, where the exact update can be computed."""
