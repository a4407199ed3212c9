"""Where a pool's members come from: a static list (the default), Consul, or DNS."""

from .base import Discovery, DiscoveryError, Watcher
from .consul import ConsulDiscovery
from .dns import DNSDiscovery

__all__ = ["ConsulDiscovery", "DNSDiscovery", "Discovery", "DiscoveryError", "Watcher"]
