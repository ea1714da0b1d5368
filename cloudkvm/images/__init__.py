"""Cloud images: digests (digest.py); the image cache, downloads and overlays come next (issue 13)."""
