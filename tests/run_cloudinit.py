"""Run Debian's cloud-init datasource discovery confined to a test root, without booting.

    python3 tests/run_cloudinit.py ROOT DATASOURCE[,DATASOURCE...] [--metadata-url URL] [--network]

This is cloud-init's own ``stages.Init``: ``fetch`` finds the datasource (``get_data`` then
``persist_instance_data`` writes ROOT/run/cloud-init/instance-data-sensitive.json),
``instancify`` links the instance directory and ``update`` stores the raw user-data in
ROOT/var/lib/cloud/instances/<instance id>/user-data.txt, as ``cloud-init init`` does at boot.

Two things are confined to ROOT. The configuration: ``Init`` merges /etc/cloud and re-reads
it after ``fetch``, which would send every path back to the host's /var/lib/cloud and
/run/cloud-init, so ``_read_cfg`` returns a fixed configuration whose paths are under ROOT.
And the temporary directories, which cloud-init running as root makes under /run/cloud-init.
Seeds go in ROOT/var/lib/cloud/seed/nocloud or .../config_drive; Ec2 reads --metadata-url.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("datasources")
    parser.add_argument("--metadata-url")
    parser.add_argument("--network", action="store_true", help="the network stage (cloud-init.service)")
    args = parser.parse_args()

    from cloudinit import sources, stages, temp_utils  # type: ignore[import-untyped]

    root = args.root.rstrip("/")
    # As root, cloud-init makes its temporary directories in /run/cloud-init/tmp (and
    # /var/tmp/cloud-init for executables) on the host: keep them under ROOT as well.
    temp_utils._TMPDIR = f"{root}/run/cloud-init/tmp"
    temp_utils._EXE_ROOT_TMPDIR = f"{root}/var/tmp/cloud-init"
    cfg: dict[str, Any] = {
        "system_info": {
            "distro": "debian",
            "paths": {
                "cloud_dir": f"{root}/var/lib/cloud",
                "run_dir": f"{root}/run/cloud-init",
                "templates_dir": "/etc/cloud/templates",
            },
        },
        "datasource_list": [*args.datasources.split(","), "None"],
        "datasource": {},
    }
    if args.metadata_url:
        cfg["datasource"]["Ec2"] = {"metadata_urls": [args.metadata_url], "timeout": 2, "max_wait": 10}

    class ConfinedInit(stages.Init):  # type: ignore[misc]
        def _read_cfg(self, extra_fns: Any) -> dict[str, Any]:
            return copy.deepcopy(cfg)

    deps = [sources.DEP_FILESYSTEM, sources.DEP_NETWORK] if args.network else [sources.DEP_FILESYSTEM]
    init = ConfinedInit(ds_deps=deps)
    init.initialize()  # creates ROOT/var/lib/cloud/...; no log file: the configuration names none
    datasource = init.fetch(existing="trust")
    init.instancify()
    init.update()
    print(f"datasource {datasource.dsname} {datasource.get_instance_id()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
