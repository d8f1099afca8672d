"""stepd: a process-step engine. A delegate module writes

    from stepd import delegate

    @delegate("invoice.send")
    def send_invoice(ctx): ...

Importing this package loads only the delegate API (no Flask, no database).
"""

from stepd.delegates import Abort, Context, RetryPolicy, delegate
from stepd.model import VERSION as __version__

__all__ = ["Abort", "Context", "RetryPolicy", "__version__", "delegate"]
