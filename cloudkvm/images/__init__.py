"""Cloud images: digests, downloads and the cache, unpacking, partitions and ext file systems, the kernel inside an
image, the cloud-init NoCloud seed and the instance key pair (docs/architecture.md, "Cloud images")."""
