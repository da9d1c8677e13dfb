%%%----------------------------------------------------------------------
%%% mod_push_py_commands: the ejabberdctl commands of mod_push_py. Each runs in the
%%% caller's process and asks the host's port owner (mod_push_py_port), which passes
%%% it to Python as a {command, Ref, Name, Args} event; Python's command_result is the
%%% answer. mod_push_py registers them when it starts (get_commands_spec/0).
%%%
%%% Copyright (C) 2026 the pymod_push authors. GPL-2.0-or-later.
%%%----------------------------------------------------------------------
-module(mod_push_py_commands).

-export([get_commands_spec/0, push_status/1, push_list/2, push_delete/3, push_test/2,
         push_wake_all/1, push_delete_old/2, push_reload_logic/1, push_diagnose/2,
         push_diagnose_test/2, push_up_list/2, push_up_revoke/3]).

-include("ejabberd_commands.hrl").

-import(mod_push_py_port, [proc/1]).

-spec get_commands_spec() -> [ejabberd_commands()].
get_commands_spec() ->
    Host = {host, binary}, User = {user, binary},
    [#ejabberd_commands{
        name = push_status, tags = [push], module = ?MODULE, function = push_status,
        desc = "Status of mod_push_py on a host",
        longdesc = "Whether the Python process is up, since when, its version, events and "
                   "pushes handled, pushes per backend and outcome, and queue depths.",
        args = [Host], args_desc = ["Virtual host"], args_example = [<<"example.org">>],
        result = {status, string}, result_example = "pymod_push 0.1.0 ..."},
     #ejabberd_commands{
        name = push_list, tags = [push], module = ?MODULE, function = push_list,
        desc = "List a user's push registrations and app-server devices",
        longdesc = "One line per XEP-0357 registration (session, app server, node, "
                   "errors) and per device registered at the built-in app server.",
        args = [User, Host], args_desc = ["User name", "Virtual host"],
        args_example = [<<"alice">>, <<"example.org">>],
        result = {registrations, string}, result_example = "session phone: ..."},
     #ejabberd_commands{
        name = push_delete, tags = [push], module = ?MODULE, function = push_delete,
        desc = "Delete a user's push registration and app-server device by node",
        longdesc = "Removes the XEP-0357 registrations with that node and the device of "
                   "the built-in app server with that node (see push_list).",
        args = [User, Host, {node, binary}],
        args_desc = ["User name", "Virtual host", "Node, as push_list shows it"],
        args_example = [<<"alice">>, <<"example.org">>, <<"2c5fa...">>],
        result = {deleted, string}, result_example = "deleted 1 push registration(s) ..."},
     #ejabberd_commands{
        name = push_test, tags = [push], module = ?MODULE, function = push_test,
        desc = "Send a test push to each of a user's push registrations",
        longdesc = "A push like the one after a restart: counts only, no message.",
        args = [User, Host], args_desc = ["User name", "Virtual host"],
        args_example = [<<"alice">>, <<"example.org">>],
        result = {sent, string}, result_example = "sent 2 test push(es)"},
     #ejabberd_commands{
        name = push_wake_all, tags = [push], module = ?MODULE, function = push_wake_all,
        desc = "Wake every pending push session of a host on this node",
        longdesc = "Sends one push to each registration whose session is pending here, so "
                   "that the devices reconnect (e.g. before a planned restart).",
        args = [Host], args_desc = ["Virtual host"], args_example = [<<"example.org">>],
        result = {woken, string}, result_example = "woke 12 pending push session(s)"},
     #ejabberd_commands{
        name = push_delete_old, tags = [push], module = ?MODULE, function = push_delete_old,
        desc = "Delete push registrations enabled more than N days ago",
        longdesc = "Clients re-enable push whenever they connect; registrations that were "
                   "not renewed for that long belong to devices that are gone.",
        args = [Host, {days, integer}], args_desc = ["Virtual host", "Days"],
        args_example = [<<"example.org">>, 90],
        result = {deleted, string}, result_example = "deleted 3 push registration(s) ..."},
     #ejabberd_commands{
        name = push_reload_logic, tags = [push], module = ?MODULE,
        function = push_reload_logic,
        desc = "Load the push logic module (option logic) and the python "
               "providers again",
        longdesc = "Python reads the module again and tries each of its functions once; "
                   "if it does not import or a trial fails, the running module stays and "
                   "the answer (and the log) says why.",
        args = [Host], args_desc = ["Virtual host"], args_example = [<<"example.org">>],
        result = {reloaded, string},
        result_example = "push logic /etc/ejabberd/push_logic.py reloaded: should_push"},
     #ejabberd_commands{
        name = push_diagnose, tags = [push], module = ?MODULE, function = push_diagnose,
        desc = "Push check-up of a user: why do they get no notifications?",
        longdesc = "For each push registration and device: the app server or provider, "
                   "since when, the last push and its answer, error counts, the user's "
                   "options and filters, whether the app server is reachable from here, "
                   "and the newest log lines about the user. No token, node or body shown.",
        args = [User, Host], args_desc = ["User name", "Virtual host"],
        args_example = [<<"alice">>, <<"example.org">>],
        result = {report, string}, result_example = "push check-up of alice@example.org ..."},
     #ejabberd_commands{
        name = push_diagnose_test, tags = [push], module = ?MODULE,
        function = push_diagnose_test,
        desc = "Push check-up of a user, with a test push to each registration",
        longdesc = "As push_diagnose, after a test push to each registration; answers once "
                   "each test push is answered, or after 10 s.",
        args = [User, Host], args_desc = ["User name", "Virtual host"],
        args_example = [<<"alice">>, <<"example.org">>],
        result = {report, string}, result_example = "sent 1 test push(es) ..."},
     #ejabberd_commands{
        name = push_up_list, tags = [push], module = ?MODULE, function = push_up_list,
        desc = "List a user's UnifiedPush endpoints",
        longdesc = "One line per endpoint: its id (a short hash of the application and "
                   "instance), the resource it delivers to, its expiry, the last delivery "
                   "and how many pushes are kept for it. No token or URL shown.",
        args = [User, Host], args_desc = ["User name", "Virtual host"],
        args_example = [<<"alice">>, <<"example.org">>],
        result = {endpoints, string}, result_example = "1a2b3c4d phone expires ..."},
     #ejabberd_commands{
        name = push_up_revoke, tags = [push], module = ?MODULE, function = push_up_revoke,
        desc = "Revoke a user's UnifiedPush endpoint, or all of them",
        longdesc = "Deletes the endpoint with that id (see push_up_list), or every endpoint "
                   "of the user with 'all', and the pushes kept for it; POSTs to it get 404 "
                   "from then on.",
        args = [User, Host, {id, binary}],
        args_desc = ["User name", "Virtual host", "Endpoint id, as push_up_list shows it, or all"],
        args_example = [<<"alice">>, <<"example.org">>, <<"1a2b3c4d">>],
        result = {revoked, string}, result_example = "revoked 1 endpoint(s)"}].

-spec push_status(binary()) -> string().
push_status(Host) -> command(Host, status, []).
-spec push_list(binary(), binary()) -> string().
push_list(User, Host) -> command(Host, list, [User, Host]).
-spec push_delete(binary(), binary(), binary()) -> string().
push_delete(User, Host, Node) -> command(Host, delete, [User, Host, Node]).
-spec push_test(binary(), binary()) -> string().
push_test(User, Host) -> command(Host, test, [User, Host]).
-spec push_wake_all(binary()) -> string().
push_wake_all(Host) -> command(Host, wake_all, []).
-spec push_delete_old(binary(), integer()) -> string().
push_delete_old(Host, Days) -> command(Host, delete_old, [integer_to_binary(Days)]).
-spec push_reload_logic(binary()) -> string().
push_reload_logic(Host) -> command(Host, reload_logic, []).
-spec push_diagnose(binary(), binary()) -> string().
push_diagnose(User, Host) -> diagnose(User, Host, diagnose).
-spec push_diagnose_test(binary(), binary()) -> string().
push_diagnose_test(User, Host) -> diagnose(User, Host, diagnose_test).
-spec push_up_list(binary(), binary()) -> string().
push_up_list(User, Host) -> command(Host, up_list, [User, Host]).
-spec push_up_revoke(binary(), binary(), binary()) -> string().
push_up_revoke(User, Host, Id) -> command(Host, up_revoke, [User, Host, Id]).

%% Python names the app servers' domains; the shim says how each is reachable from here.
diagnose(User, Host, Name) ->
    Domains = string:lexemes(command(Host, diagnose_domains, [User, Host]), "\n"),
    command(Host, Name, [User, Host | mod_push_py_actions:route_states(jid:nameprep(Host),
                                                                       Domains)]).

command(Host, Name, Args) ->
    LHost = jid:nameprep(Host),
    try gen_server:call(proc(LHost), {command, Name, Args}, timer:seconds(30)) of
        Text -> unicode:characters_to_list(Text)
    catch exit:{noproc, _} -> "mod_push_py is not running on " ++ binary_to_list(Host);
          exit:{timeout, _} -> "the Python process did not answer within 30 s";
          exit:{Why, _} ->
            lists:flatten(io_lib:format("mod_push_py's port owner ended (~p): try again", [Why]))
    end.
