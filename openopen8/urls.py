from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("v1/", include("gateway.urls")),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]

handler404 = "gateway.errors.handler404"
handler500 = "gateway.errors.handler500"
