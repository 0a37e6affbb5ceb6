"""The tenant's receipt: her right of access (GDPR article 15), in plain French.

`read_receipt` checks who reads and audits the reading; `build_receipt` turns the ledger's
rows into a `Receipt` (pure); `render_text`, `render_html`, `render_pdf` show it."""

from partnerbus.receipt.access import (
    READ,
    REFUSED,
    ReceiptRefused,
    agencies_of,
    load_person,
    read_receipt,
)
from partnerbus.receipt.build import PersonRecord, build_receipt
from partnerbus.receipt.model import Receipt, Retention
from partnerbus.receipt.render import (
    PdfUnavailableError,
    check_pdf,
    render_html,
    render_pdf,
    render_text,
    write_html,
    write_pdf,
)

__all__ = [
    "READ",
    "REFUSED",
    "PdfUnavailableError",
    "PersonRecord",
    "Receipt",
    "ReceiptRefused",
    "Retention",
    "agencies_of",
    "build_receipt",
    "check_pdf",
    "load_person",
    "read_receipt",
    "render_html",
    "render_pdf",
    "render_text",
    "write_html",
    "write_pdf",
]
