%%%----------------------------------------------------------------------
%%% mod_push_py_opt: the options of mod_push_py, their defaults and documentation.
%%%
%%% What ejabberd validates in the modules section (mod_opt_type/1, the backends'
%%% own checks), the defaults (mod_options/1), what 'ejabberdctl module_options'
%%% and ejabberd's documentation show (mod_doc/0), opt/2, how the other two
%%% modules read an option, and for_python/1, the options as Python gets them.
%%% gen_mod calls mod_push_py's mod_opt_type/1, mod_options/1 and mod_doc/0,
%%% which call these.
%%%
%%% Copyright (C) 2026 the pymod_push authors. GPL-2.0-or-later.
%%%----------------------------------------------------------------------
-module(mod_push_py_opt).

-export([mod_opt_type/1, mod_options/1, mod_doc/0, opt/2, for_python/1]).

-include("translate.hrl").

%% An option of mod_push_py on Host, as ejabberd validated it.
-spec opt(binary(), atom()) -> term().
opt(Host, Opt) ->
    gen_mod:get_module_opt(Host, mod_push_py, Opt).

%% The options in the port owner's hello to Python, all but access_backends (an ejabberd
%% access rule, applied here), with what else Python needs to know of ejabberd.
-spec for_python(binary()) -> #{atom() => term()}.
for_python(Host) ->
    Opts = maps:from_list(
             [{Opt, opt(Host, Opt)} || {Opt, _} <- mod_options(Host), Opt /= access_backends]),
    Opts#{spool_dir => unicode:characters_to_binary(mnesia:system_info(directory)),
          node => node(), loglevel => ejabberd_logger:get(),
          max_ack_queue => max_ack_queue(Host)}.

%% How many stanzas mod_stream_mgmt lets a session hold unacknowledged (it ends the
%% session beyond): Python remembers no more pushed messages per pending session.
%% ejabberd's default for infinity or without the module.
max_ack_queue(Host) ->
    try gen_mod:get_module_opt(Host, mod_stream_mgmt, max_ack_queue) of
        N when is_integer(N), N > 0 -> N;
        _ -> 5000
    catch _:_ -> 5000
    end.

-spec mod_opt_type(atom()) -> econf:validator().
mod_opt_type(python) -> econf:and_then(econf:binary("^/"), econf:file(read));
mod_opt_type(resume_timeout) -> econf:timeout(second);
mod_opt_type(reply_timeout) -> econf:timeout(second);
mod_opt_type(publish_timeout) -> econf:timeout(second);
mod_opt_type(include_senders) -> econf:bool();
mod_opt_type(include_message_count) -> econf:bool();
mod_opt_type(include_subscription_count) -> econf:bool();
mod_opt_type(include_message_bodies) -> econf:bool();
mod_opt_type(allow_senders) -> econf:bool();
mod_opt_type(allow_message_bodies) -> econf:bool();
mod_opt_type(notify_on) -> econf:enum([messages, all]);
mod_opt_type(notify_groupchat) -> econf:enum([mentions, always, never]);
mod_opt_type(max_publish_errors) -> econf:pos_int();
mod_opt_type(publish_error_window) -> econf:timeout(second);
mod_opt_type(diagnose_test_interval) -> econf:timeout(second);
mod_opt_type(max_body_length) -> econf:pos_int();
mod_opt_type(max_registrations) -> econf:pos_int();
mod_opt_type(max_devices) -> econf:pos_int();
mod_opt_type(push_iq_rate) -> econf:pos_int();
mod_opt_type(publish_rate) -> econf:pos_int();
mod_opt_type(logic) -> econf:either(undefined, econf:binary());
mod_opt_type(logic_budget) -> econf:pos_int();
mod_opt_type(log_sensitive) -> econf:bool();
mod_opt_type(ios_extensions) -> econf:bool();
mod_opt_type(metrics_listen) -> econf:either(undefined, econf:binary("^.+:[0-9]+$"));
mod_opt_type(wake_on_start) -> econf:bool();
mod_opt_type(wake_rate) -> econf:pos_int();
mod_opt_type(wake_before_timeout) -> econf:timeout(second);
mod_opt_type(call_ring_window) -> econf:timeout(second);
mod_opt_type(groupchat_pushes) -> econf:bool();
mod_opt_type(groupchat_push_interval) -> econf:timeout(second);
mod_opt_type(retry_delays) -> econf:list(econf:timeout(second));
mod_opt_type(db_file) -> econf:either(auto, econf:binary());
mod_opt_type(db_url) -> econf:either(undefined, econf:binary("^postgres(ql)?://"));
mod_opt_type(queue_size) -> econf:pos_int();
mod_opt_type(certfile) -> econf:either(undefined, econf:file(read));
mod_opt_type(access_backends) -> econf:acl();
mod_opt_type(endpoint_allow_ips) -> econf:list(econf:ip_mask());
%% UnifiedPush: the public base URL of the request handler (no query or fragment: the
%% token is appended as a path segment); off when undefined.
mod_opt_type(unified_push_url) ->
    econf:either(undefined, econf:and_then(econf:url([http, https]),
                                           econf:binary("^[hH][tT][tT][pP][sS]?://[^?#]+$")));
mod_opt_type(unified_push_access) -> econf:acl();
mod_opt_type(unified_push_expiration) ->
    econf:and_then(econf:timeout(second), fun at_most_60_days/1);
mod_opt_type(unified_push_max_ttl) -> econf:timeout(second);
mod_opt_type(unified_push_max_kept) -> econf:pos_int();
mod_opt_type(unified_push_rate) -> econf:pos_int();
mod_opt_type(unified_push_burst) -> econf:pos_int();
mod_opt_type(unified_push_max_endpoints) -> econf:pos_int();
mod_opt_type(backends) ->
    econf:list(
      econf:and_then(
        econf:options(
          (backend_options())#{'_' => econf:any()},  % a python provider's own options
          [{required, [type, register_host, pubsub_host]}, {return, map}, unique]),
        fun check_backend/1)).

%% Conversations renews an endpoint within a day of its expiry; apps keep theirs for long.
at_most_60_days(Ms) when Ms =< 60 * 86400000 -> Ms;
at_most_60_days(Ms) -> yconf:fail(yconf, {bad_int, 1, 60 * 86400, Ms div 1000}).

backend_options() ->
          #{type => econf:enum([apns, fcm, gcm, webpush, mozilla, ubuntu, wns, python]),
            module => econf:binary(),
            name => econf:binary("^[a-z0-9][a-z0-9_-]*$"),
            app_name => econf:binary(),
            register_host => econf:domain(),
            pubsub_host => econf:domain(),
            certfile => econf:file(read),
            auth_key => econf:binary(),
            package_sid => econf:binary(),
            topic => econf:binary(),
            voip_topic => econf:binary(),
            call_end_alert => econf:bool(),
            key_file => econf:file(read),
            key_id => econf:binary(),
            team_id => econf:binary(),
            sandbox => econf:bool(),
            service_account_file => econf:file(read),
            project_id => econf:binary(),
            vapid_private_key_file => econf:file(read),
            vapid_subject => econf:binary(),
            channel_domains => econf:list(econf:domain()),
            endpoint => econf:url(),
            cafile => econf:file(read)}.

%% A provider written in Python takes options of its own; it is named after its
%% module unless it says otherwise, and its register-push-Name command must not shadow a
%% shipped one. Python names it (pymod_push/core/config.py, default_name); the name is
%% derived here by the same rule only to refuse such a provider when ejabberd validates
%% the options, before any Python process runs.
check_backend(#{type := python, module := Module} = Backend) ->
    Base = filename:basename(Module),
    Name = maps:get(name, Backend, case filename:extension(Base) of
                                       <<".py">> -> filename:rootname(Base);
                                       _ -> lists:last(binary:split(Base, <<".">>, [global]))
                                   end),
    case lists:member(Name, [<<"apns">>, <<"fcm">>, <<"gcm">>, <<"webpush">>,
                             <<"mozilla">>, <<"ubuntu">>, <<"wns">>]) of
        true -> yconf:fail(yconf, {bad_enum, [python_provider_name], binary_to_atom(Name)});
        false -> maps:merge(#{app_name => <<"any">>}, Backend)
    end;
check_backend(#{type := python}) ->
    yconf:fail(yconf, {missing_option, module});
%% What each provider needs besides the common options; 'app_name: any' is only
%% for types that need no developer credentials.
check_backend(#{type := Type} = Backend) ->
    case [Opt || Opt <- maps:keys(Backend), not maps:is_key(Opt, backend_options())] of
        [] -> ok;
        [Unknown | _] -> yconf:fail(yconf, {unknown_option, maps:keys(backend_options()),
                                            Unknown})
    end,
    Needed = case Type of
                 apns -> case maps:is_key(key_file, Backend) of
                             true -> [key_id, team_id];
                             false -> []  % certificate auth: certfile here or global
                         end;
                 fcm -> [service_account_file];
                 gcm -> [service_account_file];
                 wns -> [auth_key, package_sid];
                 _ -> []
             end,
    Credentials = lists:member(Type, [apns, fcm, gcm, wns]),
    Needed1 = case Credentials andalso maps:get(app_name, Backend, <<"any">>) == <<"any">> of
                  true -> [app_name | Needed];
                  false -> Needed
              end,
    case [Opt || Opt <- Needed1, not maps:is_key(Opt, Backend)] of
        [] -> maps:merge(#{app_name => <<"any">>}, Backend);
        [Missing | _] -> yconf:fail(yconf, {missing_option, Missing})
    end.

-spec mod_options(binary()) -> [{atom(), term()}].
mod_options(_Host) ->
    [{python, <<"/usr/bin/python3">>},
     {resume_timeout, timer:hours(72)},
     {reply_timeout, timer:seconds(5)},
     {publish_timeout, timer:seconds(30)},
     {include_senders, false},
     {include_message_count, true},
     {include_subscription_count, true},
     {include_message_bodies, false},
     {allow_senders, true},
     {allow_message_bodies, true},
     {notify_on, messages},
     {notify_groupchat, mentions},
     {max_publish_errors, 3},
     {publish_error_window, timer:minutes(10)},
     {diagnose_test_interval, timer:seconds(60)},
     {max_body_length, 1024},
     {max_registrations, 20},
     {max_devices, 20},
     {push_iq_rate, 60},
     {publish_rate, 1000},
     {logic, undefined},
     {logic_budget, 50},
     {log_sensitive, false},
     {ios_extensions, true},
     {metrics_listen, undefined},
     {wake_on_start, true},
     {wake_rate, 50},
     {wake_before_timeout, timer:hours(1)},
     {call_ring_window, timer:seconds(60)},
     {groupchat_pushes, true},
     {groupchat_push_interval, timer:seconds(30)},
     {retry_delays, [timer:seconds(5), timer:seconds(30), timer:minutes(5)]},
     {db_file, auto},
     {db_url, undefined},
     {queue_size, 10000},
     {certfile, undefined},
     {access_backends, local},
     {endpoint_allow_ips, []},
     {unified_push_url, undefined},
     {unified_push_access, local},
     {unified_push_expiration, timer:hours(168)},
     {unified_push_max_ttl, timer:hours(24)},
     {unified_push_max_kept, 100},
     {unified_push_rate, 60},
     {unified_push_burst, 10},
     {unified_push_max_endpoints, 100},
     {backends, []}].

-spec mod_doc() -> map().
mod_doc() ->
    #{desc =>
          [?T("XEP-0357 push notifications decided by a Python process "
              "('python -m pymod_push'), which this module starts as an "
              "Erlang port and restarts when it dies. It replaces "
              "_`mod_push`_ and _`mod_push_keepalive`_, which must not be "
              "enabled on the same host."), "",
           ?T("Push users whose stream management session is pending are "
              "kept resumable for 'resume_timeout', and get one push per "
              "message, including messages that go to offline storage.")],
      opts =>
          [{python,
            #{value => ?T("Path"),
              desc => ?T("Absolute path of the Python interpreter that has "
                         "the pymod_push package installed, readable and "
                         "executable by the ejabberd user. The default is "
                         "'/usr/bin/python3'.")}},
           {resume_timeout,
            #{value => "timeout()",
              desc => ?T("How long the session of a disconnected push client "
                         "stays resumable. The resumption timeout configured "
                         "for _`mod_stream_mgmt`_ is restored on resume. The "
                         "default is '72' hours.")}},
           {reply_timeout,
            #{value => "timeout()",
              desc => ?T("How long a push IQ (enable/disable) waits for the "
                         "Python process before it is answered with "
                         "'internal-server-error'. The default is '5' seconds.")}},
           {publish_timeout,
            #{value => "timeout()",
              desc => ?T("How long to wait for the app server's reply to a "
                         "publish before it counts as a transient failure. "
                         "The default is '30' seconds.")}},
           {include_senders,
            #{value => "true | false",
              desc => ?T("Include the sender of the last message in "
                         "notifications. The default is 'false'.")}},
           {include_message_count,
            #{value => "true | false",
              desc => ?T("Include the number of messages queued since the "
                         "client went away. The default is 'true'.")}},
           {include_subscription_count,
            #{value => "true | false",
              desc => ?T("Include the number of pending subscription "
                         "requests. The default is 'true'.")}},
           {include_message_bodies,
            #{value => "true | false",
              desc => ?T("Include the body of the last message. The default "
                         "is 'false'.")}},
           {allow_senders,
            #{value => "true | false",
              desc => ?T("Whether users may have senders in their notifications "
                         "('false' forbids it server-wide, whatever users ask "
                         "for). The default is 'true'.")}},
           {allow_message_bodies,
            #{value => "true | false",
              desc => ?T("Whether users may have message bodies in their "
                         "notifications. The default is 'true'.")}},
           {notify_on,
            #{value => "messages | all",
              desc => ?T("'messages': push for messages with a body and "
                         "subscription requests; 'all': push for every "
                         "message (chat states, receipts...). The default is "
                         "'messages'.")}},
           {notify_groupchat,
            #{value => "mentions | always | never",
              desc => ?T("Group chat messages to a pending occupant: push only "
                         "those that mention the occupant's nickname in that "
                         "room ('mentions', the default), all of them, or none.")}},
           {max_publish_errors,
            #{value => ?T("Number"),
              desc => ?T("Failed publishes (an error or no answer from the app "
                         "server), counted at most once per "
                         "'publish_error_window', after which that registration "
                         "is disabled; 'item-not-found' disables it at once. A "
                         "success starts the count again. The default is '3'.")}},
           {publish_error_window,
            #{value => "timeout()",
              desc => ?T("Failures of one registration within this time of the "
                         "last one counted count once: an app server that is "
                         "away or overloaded for a while costs one error, not "
                         "one per notification. The default is '10' minutes.")}},
           {diagnose_test_interval,
            #{value => "timeout()",
              desc => ?T("A user's test pushes by the ad-hoc command "
                         "'push-diagnose' (the push check-up): at most one "
                         "per this time. The default is '60' seconds.")}},
           {max_body_length,
            #{value => ?T("Number"),
              desc => ?T("Bytes of a message body that a notification carries at "
                         "most; a longer body is cut on a character boundary and "
                         "ends with '...' (U+2026). Providers' payloads are kept "
                         "within their limits whatever this is. The default is "
                         "'1024'.")}},
           {max_registrations,
            #{value => ?T("Number"),
              desc => ?T("Push registrations (enables with distinct app server and "
                         "node) one account may hold; an enable beyond gets "
                         "'resource-constraint'. Re-enabling a registration does "
                         "not count. The default is '20'.")}},
           {max_devices,
            #{value => ?T("Number"),
              desc => ?T("Devices one account may register at the built-in app "
                         "server; a registration beyond gets 'resource-constraint'. "
                         "Registering a device again does not count. The default "
                         "is '20'.")}},
           {push_iq_rate,
            #{value => ?T("Number"),
              desc => ?T("Push IQs (enable, disable) and app-server registration "
                         "commands one account may send per minute, in a burst or "
                         "spread out, and as many UnifiedPush registrations; beyond, "
                         "ejabberd answers them with "
                         "'resource-constraint' (type wait) without asking Python. "
                         "The default is '60'.")}},
           {publish_rate,
            #{value => ?T("Number"),
              desc => ?T("Publishes a second this node sends to any one remote "
                         "app-server domain (not the host, its subdomains or the "
                         "backends' pubsub hosts), after a burst of as many; what is "
                         "over the rate waits and is sent at the rate, in order, "
                         "never dropped. The default is '1000'.")}},
           {logic,
            #{value => ?T("Module"),
              desc => ?T("Push logic written by the admin in Python: an importable "
                         "module name or the path of a '.py' file, readable by the "
                         "ejabberd user, defining any of 'should_push', 'summary' and "
                         "'provider_data' (see pymod_push/logic.py). Errors in it are "
                         "logged and the defaults used. The default is none.")}},
           {logic_budget,
            #{value => ?T("Milliseconds"),
              desc => ?T("How long a notification may wait for the push logic: an "
                         "'async def' function that has not answered by then is "
                         "cancelled and the default used for that notification (only that "
                         "user's notifications wait meanwhile); a plain function slower "
                         "than this three times is switched off. The default is '50'.")}},
           {log_sensitive,
            #{value => "true | false",
              desc => ?T("At loglevel debug, also log what notifications contain "
                         "(summaries, provider requests with device tokens and "
                         "payloads). Off by default: bodies, tokens and secrets never "
                         "appear in the log otherwise.")}},
           {ios_extensions,
            #{value => "true | false",
              desc => ?T("Offer Tigase's push extensions, which Siskin IM and Snikket "
                         "iOS use: notifications encrypted with a key only the device "
                         "holds, high or low priority, filters (muted chats, group "
                         "chat rules, unknown senders) and call pushes. The account's "
                         "disco#info lists them and the clients' choices are kept with "
                         "each registration. The default is 'true'.")}},
           {metrics_listen,
            #{value => ?T("Host:Port"),
              desc => ?T("Serve Prometheus metrics (events, publishes and provider "
                         "pushes by outcome, provider latency, queue depths, "
                         "registrations) at http://Host:Port/metrics. Each virtual "
                         "host's Python process needs its own address. The default is "
                         "none: no metrics endpoint.")}},
           {wake_on_start,
            #{value => "true | false",
              desc => ?T("After ejabberd has started, send one push to every push "
                         "registration whose session was on this node, so that "
                         "devices whose sessions were lost reconnect. The default "
                         "is 'true'.")}},
           {wake_rate,
            #{value => ?T("Number"),
              desc => ?T("How many of those wake-up pushes per second, so that a "
                         "large server does not flood its app servers. The default "
                         "is '50'.")}},
           {wake_before_timeout,
            #{value => "timeout()",
              desc => ?T("Wake a pending push session this long before its "
                         "'resume_timeout' runs out, once, so that the device "
                         "reconnects before the session is lost ('0' turns this "
                         "off). The default is '1' hour.")}},
           {call_ring_window,
            #{value => "timeout()",
              desc => ?T("A call proposal older than this (from its delay stamp, "
                         "else its arrival) is pushed as a missed call, never "
                         "urgent; a call that ends within it stops the devices its "
                         "urgent push reached. The default is '60' seconds.")}},
           {groupchat_pushes,
            #{value => "true | false",
              desc => ?T("Push the affiliated members of this host's rooms who are "
                         "not in the room (no occupant, no MUC/Sub subscription) "
                         "when a message arrives there, as their XEP-0492 bookmark "
                         "setting, their client's filter or the room type says. "
                         "The default is 'true'.")}},
           {groupchat_push_interval,
            #{value => "timeout()",
              desc => ?T("At most one push per member and room within this time, "
                         "unless the member is mentioned; the next counts the "
                         "messages since. The default is '30' seconds.")}},
           {retry_delays,
            #{value => "[timeout()]",
              desc => ?T("Delays between attempts when the app server answers "
                         "with an error other than 'item-not-found' or does not "
                         "answer. The default is '[5 s, 30 s, 5 min]'.")}},
           {db_file,
            #{value => ?T("auto | Path"),
              desc => ?T("SQLite database of push state. 'auto' (the default) "
                         "puts 'pymod_push_HOST.sqlite3' in ejabberd's spool "
                         "directory.")}},
           {db_url,
            #{value => ?T("postgresql://User:Password@Host:Port/Database"),
              desc => ?T("Keep the push state in PostgreSQL instead of 'db_file': "
                         "for clusters, all nodes point at the same database and each "
                         "node's Python process serves the sessions of its node. The "
                         "default is none (SQLite).")}},
           {queue_size,
            #{value => ?T("Number"),
              desc => ?T("How many events are kept while the Python process "
                         "is restarting; more are dropped and logged. The "
                         "default is '10000'.")}},
           {access_backends,
            #{value => ?T("AccessName"),
              desc => ?T("Who may register at the built-in app server: an "
                         "access rule, or 'local', the users of this server's "
                         "own virtual hosts (whether or not an access rule of that "
                         "name is defined). 'all' lets anyone, accounts of other "
                         "servers included. The default is 'local'.")}},
           {endpoint_allow_ips,
            #{value => "[IP/Mask]",
              desc => ?T("Addresses that the destinations users register (Web Push "
                         "and UnifiedPush endpoints, WNS channel URIs) may reach "
                         "although they are loopback, private, link-local or "
                         "otherwise not on the public internet: for example a "
                         "UnifiedPush server on your LAN ('192.168.1.0/24'). "
                         "The default is none: such destinations are refused.")}},
           {unified_push_url,
            #{value => ?T("URL"),
              desc => ?T("Turns on the UnifiedPush server on this host (users' apps get "
                         "push endpoints through Conversations): the public base URL of "
                         "the HTTP request handler 'mod_push_py' of an ejabberd listener "
                         "(for example 'https://example.org/up' for 'request_handlers: "
                         "{\"/up\": mod_push_py}'), as app servers reach it (through a "
                         "reverse proxy: its URL). http or https, no query or fragment. "
                         "The default is none: no UnifiedPush on this host.")}},
           {unified_push_access,
            #{value => ?T("AccessName"),
              desc => ?T("Who may register UnifiedPush endpoints: an access rule, or "
                         "'local', the users of this server's own virtual hosts (as "
                         "for 'access_backends'); others get 'forbidden'. The default "
                         "is 'local'.")}},
           {unified_push_expiration,
            #{value => "timeout()",
              desc => ?T("The expiration given to an endpoint at each registration; "
                         "Conversations registers again within a day of it, and the "
                         "endpoint's URL stays the same. At most 60 days. The default "
                         "is '7' days.")}},
           {unified_push_max_ttl,
            #{value => "timeout()",
              desc => ?T("How long a UnifiedPush message that cannot be delivered now "
                         "is kept at most (the sender's TTL, capped by this); also the "
                         "TTL of a POST without a TTL header. The default is '1' day.")}},
           {unified_push_max_kept,
            #{value => ?T("Number"),
              desc => ?T("UnifiedPush messages kept per endpoint at most; beyond, the "
                         "oldest is dropped. The default is '100'.")}},
           {unified_push_rate,
            #{value => ?T("Number"),
              desc => ?T("POSTs a minute per endpoint, after a burst of "
                         "'unified_push_burst'; beyond, HTTP 429 with Retry-After. "
                         "The default is '60'.")}},
           {unified_push_burst,
            #{value => ?T("Number"),
              desc => ?T("POSTs an endpoint may get at once before "
                         "'unified_push_rate' applies. The default is '10'.")}},
           {unified_push_max_endpoints,
            #{value => ?T("Number"),
              desc => ?T("UnifiedPush endpoints one account may hold; a registration "
                         "beyond gets 'not-allowed'. Registering an endpoint again does "
                         "not count. The default is '100'.")}},
           {certfile,
            #{value => ?T("Path"),
              desc => ?T("Default client certificate (PEM with its key) for "
                         "backends that authenticate with one (APNs).")}},
           {backends,
            #{value => "[Backend]",
              desc => ?T("The built-in app server: a list of backends, each with "
                         "'type' (apns, fcm, gcm, webpush, mozilla, ubuntu, wns), "
                         "'register_host', 'pubsub_host', 'app_name' (default "
                         "'any', only for types without credentials) and what "
                         "the provider needs: 'topic', 'key_file', 'key_id', "
                         "'team_id', 'sandbox', 'certfile', 'voip_topic' (APNs; "
                         "calls go as VoIP pushes to devices that registered "
                         "a 'voip-token'); "
                         "'service_account_file', 'project_id' (FCM); "
                         "'vapid_private_key_file', 'vapid_subject' (Web Push); "
                         "'auth_key', 'package_sid' and 'channel_domains' (WNS: "
                         "the domains devices' channel URIs must be on, https on "
                         "that domain or a name under it; the app's token goes "
                         "nowhere else; default 'notify.windows.com'); "
                         "and for all 'endpoint' "
                         "and 'cafile'. A backend of type 'python' is a provider "
                         "written in Python: 'module' (import name or .py file), "
                         "'name' (its register-push-NAME command; default: the "
                         "module's name), 'timeout' (seconds) and any options of "
                         "its own. The default is '[]'.")}}]}.
