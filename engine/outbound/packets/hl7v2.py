"""HL7 v2.5.1 packet and write-back renderers (pure): ``RENDERERS`` by format name.

=====================  ===================  ==============================================
format                 message              for
=====================  ===================  ==============================================
``hl7v2.ref_i12``      REF^I12^REF_I12      the referral packet to a specialist
``hl7v2.omg_o19``      OMG^O19^OMG_O19      the same as a 360X-style order
``hl7v2.orm_status``   ORM^O01^ORM_O01      order status back to the referring EHR
``hl7v2.oru_note``     ORU^R01^ORU_R01      the consult note back to the placer
``hl7v2.mdm_note``     MDM^T02 (T10, T08)   the consult note as a document
=====================  ===================  ==============================================

Packets: :mod:`engine.outbound.packets.hl7v2_packets` (what they take from the order
message: :mod:`~engine.outbound.packets.hl7v2_order`); write-back and its ORC-5
crosswalk: :mod:`engine.outbound.packets.hl7v2_writeback`; shared machinery:
:mod:`engine.outbound.packets.hl7v2_common` (escaping and datatypes in ``hl7v2_er7``,
copying from source messages in ``hl7v2_copy``, hl7apy validation in ``hl7v2_validate``).
Every renderer validates its output with hl7apy (v2.5.1, STRICT) and raises
:class:`~engine.outbound.model.RenderError` naming the field, never a value.
"""

from __future__ import annotations

from engine.outbound.packets import Renderer
from engine.outbound.packets.hl7v2_common import CONTENT_TYPE
from engine.outbound.packets.hl7v2_packets import omg_o19, ref_i12
from engine.outbound.packets.hl7v2_writeback import ORDER_STATUS, mdm_note, orm_status, oru_note

RENDERERS: dict[str, Renderer] = {
    "hl7v2.ref_i12": ref_i12,
    "hl7v2.omg_o19": omg_o19,
    "hl7v2.orm_status": orm_status,
    "hl7v2.oru_note": oru_note,
    "hl7v2.mdm_note": mdm_note,
}

__all__ = [
    "CONTENT_TYPE",
    "ORDER_STATUS",
    "RENDERERS",
    "mdm_note",
    "omg_o19",
    "orm_status",
    "oru_note",
    "ref_i12",
]
