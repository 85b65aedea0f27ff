"""imprint: owner-to-VM key exchange over any boot channel, without trusting the site."""

__version__ = "0.1.0"
