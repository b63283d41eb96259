"""MTN MoMo Open API: Collections (request to pay) and refunds through the Disbursement product."""

from providers.mtn_momo.adapter import MtnMomoAdapter

__all__ = ["MtnMomoAdapter"]
