"""mergekit configs as they are: ``translate`` maps a Model Stock (or uniform linear) mergekit config to
a ``Recipe``; ``published`` finds the config of a published merge (a model directory or a Hub repo,
card and config only) and loads whatever ``hf-model-stock run`` is given."""
