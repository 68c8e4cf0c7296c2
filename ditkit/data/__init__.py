"""``ditkit.data``: what training reads — image folders, built-in rendered data sets, webdataset
shards and streams, and latent encoding through an autoencoder."""
