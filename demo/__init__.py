"""xstilts.demo: the synthetic multilingual world behind `make demo` — 17 languages over one
grammar (world), rule-labelled task files in the hub datasets' schemas (generate), tiny
XLM-R encoders pretrained on the world's text (pretrain), and `prepare`, which caches both."""
