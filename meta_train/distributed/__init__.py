"""Meta-training on a Ray cluster: worker actors holding shards of the task pools. The only
sub-package that imports ray (install extra `lopt[ray]`)."""
