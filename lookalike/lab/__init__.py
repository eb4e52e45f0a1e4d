"""Training, evaluation and data tools: ``lookalike train|train-lesions|evaluate|calibrate|embed|lesions|samples``.

Nothing at run time imports this package (the plugin, the worker, the query service): it reads data sets from
files and builds models and figures; the encoders it trains are served by :mod:`lookalike.encoders`.
"""
