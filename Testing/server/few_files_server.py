"""A model-free ``medsam3 serve`` under a low open-file limit, for the file-descriptor tests.

    python few_files_server.py PORT_FILE OPEN_FILES MAX_CONNECTIONS HEADER_TIMEOUT

Logs as the ``medsam3`` command does, to stderr; writes its port to PORT_FILE once it listens.
"""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path


def main(port_file: str, open_files: str, max_connections: str, header_timeout: str) -> None:
    from MedicalSAM3Core.serving.app import ServerConfig, create_app
    from MedicalSAM3Core.serving.serve import ConnectionLimits, ServeSettings, uvicorn_server, write_port_when_listening

    logging.basicConfig(level=logging.WARNING, format="medsam3: %(levelname)s: %(message)s")
    logging.getLogger("medsam3.server").setLevel(logging.INFO)
    limits = ConnectionLimits(max_connections=int(max_connections), header_timeout=float(header_timeout))
    server = uvicorn_server(create_app(lambda *args: None, ServerConfig()),
                            ServeSettings(model="", port=0, connections=limits), log_level="warning")
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(open_files), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    write_port_when_listening(server, Path(port_file))
    server.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
