"""Moderation and the realtime console in the Django admin.

Deleting a message here goes through the same action as the socket, so it is logged
with a seq and broadcast like any delete. The console (/admin/realtime/room/console/,
permission realtime.operate_realtime) shows the live connections by user and worker
from the cluster view, disconnects a user everywhere, and drains a worker.
"""

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path

from realtime.state import heartbeat
from realtime.delivery import publish as broadcast
from realtime.domain import services
from realtime.domain.errors import ActionError
from realtime.models import Event, Membership, Message, Room


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]
    readonly_fields = ["joined_at"]


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "kind", "is_public", "read_markers", "last_seq", "created_at"]
    list_filter = ["kind", "is_public"]
    search_fields = ["slug", "title"]
    readonly_fields = ["last_seq", "created_at"]
    inlines = [MembershipInline]

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        # A room's slug names its stream and live subscribers hold seqs of its log:
        # deleting (and re-creating) a room would silently break them.
        return False

    def get_readonly_fields(self, request, obj=None):
        # The slug names the room's stream and its events: fixed once created; so is
        # its kind (a DM's people are fixed, and its dm_key says who they are).
        fields = list(super().get_readonly_fields(request, obj))
        return fields + ["slug", "kind"] if obj is not None else fields

    def get_urls(self):
        console = path("console/", self.admin_site.admin_view(self.console), name="realtime_console")
        return [console, *super().get_urls()]

    def console(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perm("realtime.operate_realtime"):
            raise PermissionDenied("the realtime console needs the realtime.operate_realtime permission")
        if request.method == "POST":
            return self._operate(request)
        workers = async_to_sync(heartbeat.view)()
        users: dict[str, dict] = {}
        for record in workers:
            for uid, (name, count) in record.get("sockets_by_user", {}).items():
                row = users.setdefault(uid, {"id": uid, "name": name, "total": 0, "workers": {}})
                row["total"] += count
                row["workers"][record["worker"]] = count
        context = {
            **self.admin_site.each_context(request),
            "title": "Realtime console",
            "workers": workers,
            "users": sorted(users.values(), key=lambda row: (-row["total"], row["name"])),
            # The embedded default (no REDIS_URL): one process, in-memory layer. Not an
            # error: the console explains what it covers instead of warning in red.
            "shared_layer": "InMemory" not in type(get_channel_layer()).__name__,
        }
        return TemplateResponse(request, "admin/realtime/console.html", context)

    def _operate(self, request: HttpRequest) -> HttpResponse:
        action = request.POST.get("action")
        if action == "disconnect":
            try:
                user_id = int(request.POST.get("user_id", ""))
            except ValueError:
                raise PermissionDenied("bad user id") from None
            user = get_user_model().objects.filter(pk=user_id).first()
            if user is None:
                self.message_user(request, f"There is no user with id {user_id}; nothing was closed.", messages.ERROR)
                return redirect(request.path)
            async_to_sync(broadcast.force_disconnect)(user_id)
            self.message_user(
                request,
                f"Closed every socket of {user.get_username()} (user {user_id}) on every worker (close code 4003).",
                messages.SUCCESS,
            )
        elif action == "drain":
            worker = request.POST.get("worker", "")
            async_to_sync(broadcast.request_drain)(worker)
            self.message_user(request, f"Asked worker {worker} to drain (4012 in batches, then no new sockets).",
                              messages.SUCCESS)
        return redirect(request.path)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["room", "user", "role", "joined_at"]
    list_filter = ["role", "room"]
    search_fields = ["room__slug", "user__username"]
    autocomplete_fields = ["user", "room"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "room", "author", "short_body", "seq", "created_at", "edited_at", "deleted_at"]
    list_filter = ["room", ("deleted_at", admin.EmptyFieldListFilter), "created_at"]
    search_fields = ["body", "author__username", "room__slug", "client_id"]
    readonly_fields = ["room", "author", "client_id", "seq", "created_at", "edited_at", "deleted_at"]
    fields = ["room", "author", "body", "client_id", "seq", "created_at", "edited_at", "deleted_at"]
    list_select_related = ["room", "author"]
    actions = ["delete_and_broadcast"]

    @admin.display(description="body")
    def short_body(self, obj: Message) -> str:
        return "(deleted)" if obj.is_deleted else obj.body[:80]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Messages are written through the chat (with a seq and a broadcast), not here.
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        # Edits are the author's; the admin reads and deletes.
        return False

    def get_actions(self, request):
        found = super().get_actions(request)
        found.pop("delete_selected", None)
        return found

    def _delete(self, request: HttpRequest, message: Message) -> bool:
        if message.is_deleted:
            return False
        try:
            services.perform_sync(
                services.message_delete, user=request.user, slug=message.room.slug, message_id=message.pk
            )
        except ActionError as exc:
            self.message_user(request, f"Message {message.pk}: {exc.message}", messages.ERROR)
            return False
        return True

    def delete_model(self, request: HttpRequest, obj: Message) -> None:
        """The delete view: a moderated delete, broadcast to the room."""
        self._delete(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for message in queryset.select_related("room"):
            self._delete(request, message)

    @admin.action(description="Delete selected messages (broadcast to their rooms)", permissions=["delete"])
    def delete_and_broadcast(self, request: HttpRequest, queryset: QuerySet) -> None:
        done = sum(self._delete(request, message) for message in queryset.select_related("room"))
        self.message_user(request, f"Deleted {done} message(s); each room was told.", messages.SUCCESS)


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["room", "seq", "type", "created_at"]
    list_filter = ["type", "room"]
    search_fields = ["room__slug"]
    readonly_fields = ["room", "seq", "type", "payload", "created_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        # The log is append-only: removing an entry would open a gap in the seqs.
        return False
