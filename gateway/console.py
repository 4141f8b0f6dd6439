"""The console's own pages beside the admin's model pages: the dashboard and its CSV exports."""

from __future__ import annotations

import csv

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.translation import gettext as _

from gateway.dashboard import BREAKDOWNS, RANGES, breakdown, dashboard
from gateway.models import from_micros
from gateway.rollup import usage_rollup


def dashboard_view(request: HttpRequest) -> HttpResponse:
    """The dashboard, or with ``?export=model`` (channel, token, group) that breakdown as CSV."""
    if not request.user.has_perm("gateway.view_usagelog"):
        raise PermissionDenied  # it shows what was spent: for those who may read the usage rows
    range_name = request.GET.get("range", "day")
    if range_name not in RANGES:
        range_name = "day"
    export = request.GET.get("export")
    if export is not None:
        if export not in BREAKDOWNS:
            raise Http404
        return _export(export, range_name)
    context = {**admin.site.each_context(request), "title": _("Dashboard"), **dashboard(range_name)}
    return TemplateResponse(request, "admin/dashboard.html", context)


def _export(name: str, range_name: str) -> HttpResponse:
    now = timezone.now()
    usage_rollup(now)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}-{range_name}-{now:%Y%m%d-%H%M%S}.csv"'
    writer = csv.writer(response)
    writer.writerow([name, "requests", "images", "errors", "pending", "error_rate", "spend_usd"])
    for row in breakdown(name, range_name, now):
        t = row.totals
        writer.writerow([row.label, t.requests, t.images, t.errors, t.pending, f"{t.error_rate:.4f}",
                         f"{from_micros(t.cost_micros):.6f}"])
    return response
