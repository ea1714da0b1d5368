"""`cloudkvm image ls | pull | rm | prune`: the image cache on the command line (logic in images/store.py)."""
from __future__ import annotations

import json
import time
from typing import Optional

import typer

from .errors import printable

image_app = typer.Typer(no_args_is_help=True,
                        help="The image cache: cloud images by URL or path, verified by digest, shared by instances.")


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _warn(message: str) -> None:
    typer.echo(f"cloudkvm: warning: {printable(message)}", err=True)


@image_app.command("ls")
def list_(json_: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """List cached images: digest, format, virtual size, space used, location, the instances that need it."""
    from .images import store

    entries = store.list_images()
    if json_:
        typer.echo(json.dumps([entry.to_json() for entry in entries], indent=1))
        return
    typer.echo(f"{'DIGEST':19} {'FORMAT':6} {'SIZE':>10} {'ON DISK':>10}  {'LAST USED':16}  {'USED BY':16} LOCATION")
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)) if entry.last_used else "-"
        location = entry.locations[0] if entry.locations else "-"
        unverified = "" if entry.verified else " (no digest)"
        typer.echo(f"{entry.short:19} {entry.format:6} {_size(entry.size):>10} {_size(entry.file_size):>10}  "
                   f"{used:16}  {','.join(entry.used_by) or '-':16} {printable(location)}{unverified}")


@image_app.command("pull")
def pull(location: str = typer.Argument(..., help="http(s) URL, file:// URL or path of the image"),
         digest: Optional[str] = typer.Option(None, "--digest", "-d",
                                              help="sha256:HEX, sha512:HEX, or the URL or path of the distribution's "
                                                   "SHA256SUMS/SHA512SUMS file")) -> None:
    """Fetch an image into the cache (verified, unpacked if compressed), read its kernel and initrd out for
    `boot: {from_image: true}` and prepare them for this host's board, and print its path."""
    from .cloudimage import ready_boot
    from .images import store

    image = store.pull(location, digest, warn=_warn)
    ready_boot(image)
    typer.echo(f"{image.digest[:image.digest.index(':') + 13]} {image.format} {_size(image.size)} "
               f"{printable(image.location)}", err=True)
    typer.echo(str(image.path))


@image_app.command("rm")
def remove(ref: str = typer.Argument(..., help="digest prefix, location, or file name as `image ls` shows"),
           force: bool = typer.Option(False, "--force", help="remove it even if instances' overlays need it")) -> None:
    """Remove one cached image (refused while an instance's overlay needs it, unless --force)."""
    from .images import store

    entry = store.remove(ref, force=force)
    typer.echo(f"removed {entry.short} ({printable(entry.locations[0] if entry.locations else entry.key)})")


@image_app.command("prune")
def prune(dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be removed")) -> None:
    """Remove cached images no instance needs, and stale partial downloads."""
    from .images import store

    removed = store.prune(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for item in removed:
        typer.echo(f"{verb} {printable(item.what)}: {item.path}")
    typer.echo(f"{verb} {len(removed)} file(s), {_size(sum(item.size for item in removed))}", err=True)
