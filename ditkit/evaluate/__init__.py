"""``ditkit.evaluate``: how good samples are — the built-in classifiers' label accuracy and
Fréchet distance, Inception / FID / precision-recall, interval statistics, the ``.npz`` sample
files of the FID protocol, and the resolution-extrapolation report."""
