"""The comparison harness behind ``hirank compare``.

``models`` (packaged pretrained models by short name), ``tasks`` (packaged benchmark data, fixed splits,
prompts, metrics), ``methods`` (how to configure each method), ``budget`` (match every method to one
trainable-parameter budget), ``train`` (the accelerate training loop), ``measure`` (forgetting, effective
rank, timings), ``compare`` (the resumable run loop), ``results`` (atomic JSON Lines) and ``report``
(markdown table and plots). Methods are used only through ``hirank``'s public API and ``peft``.

Nothing is imported here: ``budget`` and ``methods`` need only hirank's core dependencies, the rest needs
the ``bench`` extra.
"""
