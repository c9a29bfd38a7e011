"""The comparison harness behind ``hirank compare``.

``models`` (packaged pretrained models by short name), ``tasks`` (packaged benchmark data, fixed splits,
prompts, metrics), ``methods`` (how to configure each method), ``budget`` (match every method to one
trainable-parameter budget), ``train`` (the accelerate training loop), ``measure`` (forgetting, effective
rank, forward timings), ``timing`` (the side-by-side timing pass after the runs, and the timers the benchmarks
share), ``compare`` (the resumable run loop), ``results`` (atomic JSON Lines), ``report`` (markdown table and
plots) and ``suite`` (named lists of comparisons). Methods are used only through ``hirank``'s public API and ``peft``.

Nothing is imported here: ``budget`` and ``methods`` need only hirank's core dependencies, the rest needs
the ``bench`` extra.
"""
