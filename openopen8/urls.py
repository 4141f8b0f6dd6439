from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.utils.translation import gettext_lazy as _
from django.views.generic import RedirectView

from gateway import console, views

admin.site.site_header = _("OpenOpen8 console")
admin.site.site_title = "OpenOpen8"
admin.site.index_title = _("Tokens, channels, prices and usage")
admin.site.index_template = "admin/console_index.html"  # the dashboard linked first

urlpatterns = [
    path("admin/dashboard/", admin.site.admin_view(console.dashboard_view), name="console-dashboard"),
    path("admin/", admin.site.urls),
    path("v1/", include("gateway.urls")),
    path("healthz", views.healthz),
    path("readyz", views.readyz),
    path("metrics", views.metrics),
    path("", RedirectView.as_view(url="/admin/dashboard/", permanent=False)),
]

handler400 = "gateway.exception_handlers.handler400"
handler403 = "gateway.exception_handlers.handler403"
handler404 = "gateway.exception_handlers.handler404"
handler500 = "gateway.exception_handlers.handler500"
