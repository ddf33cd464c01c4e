"""fa-train's configs, shipped inside the package so any install finds them (``pkg://fa_cli.conf``).

Importing this package registers the schemas the yaml files extend (``schema/<group>``)."""

from fa_cli.config import register

register()
