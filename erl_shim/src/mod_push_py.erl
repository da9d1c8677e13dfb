%%%----------------------------------------------------------------------
%%% mod_push_py: XEP-0357 push notifications, decided by a Python process.
%%%
%%% This module makes no push decisions. It forwards session, stanza and
%%% IQ events to `python -m pymod_push' over an Erlang port ({packet,4},
%%% External Term Format) and executes the actions Python sends back.
%%% The port protocol is documented in docs/protocol.md of pymod_push.
%%%
%%% Copyright (C) 2026 the pymod_push authors. GPL-2.0-or-later.
%%%----------------------------------------------------------------------
-module(mod_push_py).
-behaviour(gen_mod).
-behaviour(gen_server).

-protocol({xep, 357, '0.4.1'}).

%% gen_mod
-export([start/2, stop/1, reload/3, depends/2,
         mod_options/1, mod_opt_type/1, mod_doc/0]).
%% hooks and the IQ handler
-export([ejabberd_started/0, decode_iq_subel/1, process_iq/1, disco_sm_features/5,
         disco_info/5, user_send_packet/1,
         adhoc_local_items/4,
         c2s_session_pending/1, c2s_session_resumed/1, c2s_copy_session/2,
         c2s_handle_cast/2, c2s_handle_send/3,
         sm_register_connection_hook/3, offline_message/1, mam_message/7, mam_message8/8,
         remove_user/2]).
%% gen_server (the port owner)
%% ejabberdctl commands
-export([get_commands_spec/0, push_status/1, push_list/2, push_delete/3, push_test/2,
         push_wake_all/1, push_delete_old/2, push_reload_logic/1]).
-export([start_link/2, init/1, handle_call/3, handle_cast/2, handle_info/2,
         terminate/2, code_change/3]).

-include("xmpp.hrl").
-include("logger.hrl").
-include("translate.hrl").
-include("ejabberd_commands.hrl").

-define(PROTOCOL_VERSION, 3).
-define(MAX_BATCH, 64).
-define(MIN_BACKOFF, 1000).
-define(MAX_BACKOFF, 60000).
%% Python acknowledges each batch once its effects are committed; no progress for
%% this long means it hangs, and it is killed and restarted.
-define(ACK_TIMEOUT, 60000).
%% ejabberd has no hook for 'ejabberdctl set_loglevel': look now and then.
-define(LOGLEVEL_CHECK, 10000).
%% A token bucket idle this long is full again: it is forgotten.
-define(RATE_FORGET, 60000).

-record(state, {host              :: binary(),
                port              :: port() | undefined,
                status = starting :: starting | up | down | disabled,
                %% Events are {Key, Event}: Key is the event's key in the events table
                %% (see send_event/2), deleted once Python has acknowledged it.
                batch = []        :: [{integer(), term()}],  % not yet written, newest first
                %% Events kept while Python is down or far behind, oldest first; once
                %% any is held, newer ones queue behind it (events stay in order).
                held = queue:new() :: queue:queue({integer(), term()}),
                held_len = 0      :: non_neg_integer(),
                queue_size = 1    :: pos_integer(),  % the option, read once per start
                %% Batches written but not acknowledged, oldest first: sent again, with
                %% their sequence numbers, to the next Python process if this one dies.
                epoch             :: integer(),
                seq = 0           :: non_neg_integer(),
                unacked = queue:new() :: queue:queue({pos_integer(), [{integer(), term()}]}),
                unacked_len = 0   :: non_neg_integer(),
                ack_timer         :: reference() | undefined,
                dropped = 0       :: non_neg_integer(),
                backoff = ?MIN_BACKOFF :: pos_integer(),
                %% Keys of the events a crashed predecessor left in the table: already
                %% queued here, so their {event, Key} messages are ignored.
                recovered = #{}   :: #{integer() => true},
                %% For ejabberdctl: the running process's hello, when it said it, how
                %% often it was restarted, and commands waiting for its answer.
                info = #{}        :: map(),
                up_since          :: integer() | undefined,
                restarts = 0      :: non_neg_integer(),
                commands = #{}    :: #{reference() => {atom(), gen_server:from()}},
                loglevel          :: atom()}).

%%%===================================================================
%%% gen_mod
%%%===================================================================
start(Host, Opts) ->
    case mod_push_configured(Host) of
        true ->
            ?ERROR_MSG("mod_push_py is not started on ~ts: ejabberd's own mod_push "
                       "is enabled there, and both would serve urn:xmpp:push:0 "
                       "(one IQ handler per host). Remove mod_push (and "
                       "mod_push_keepalive) from that host's modules to use "
                       "mod_push_py.", [Host]),
            case ejabberd_running() of
                true -> {error, conflict_with_mod_push};
                %% At boot an error would halt the whole server: stay inert.
                false -> ok
            end;
        false ->
            case start_processes(Host, Opts) of
                {ok, _} ->
                    register_handlers(Host),
                    ejabberd_commands:register_commands(?MODULE, get_commands_spec()),
                    %% At boot, Python learns when start-up is complete (restart recovery);
                    %% the hook runs only then, not when the module starts later.
                    ejabberd_hooks:add(ejabberd_started, ?MODULE, ejabberd_started, 50),
                    ok;
                Err -> Err
            end
    end.

stop(Host) ->
    case whereis(gen_mod:get_module_proc(Host, ?MODULE)) of
        undefined -> ok;  % inert: nothing of ours is registered
        _ ->
            unregister_handlers(Host),
            ejabberd_hooks:delete(ejabberd_started, ?MODULE, ejabberd_started, 50),
            gen_mod:is_loaded_elsewhere(Host, ?MODULE)
                orelse ejabberd_commands:unregister_commands(get_commands_spec()),
            gen_mod:stop_child(?MODULE, Host),
            gen_mod:stop_child(keeper_proc(Host))
    end.

%% The keeper first: it owns the tables that outlive a crash of the port owner.
start_processes(Host, Opts) ->
    case gen_mod:start_child(?MODULE, Host, keeper, keeper_proc(Host)) of
        {ok, _} ->
            case gen_mod:start_child(?MODULE, Host, Opts) of
                {ok, _} = Ok -> Ok;
                Err -> gen_mod:stop_child(keeper_proc(Host)), Err
            end;
        Err -> Err
    end.

%% ejabberd has booted: the sessions it had before are gone (global hook, run once).
ejabberd_started() ->
    [send_event(Host, {ejabberd_started})
     || Host <- ejabberd_option:hosts(), gen_mod:is_loaded(Host, ?MODULE)],
    ejabberd_hooks:delete(ejabberd_started, ?MODULE, ejabberd_started, 50).

reload(Host, NewOpts, _OldOpts) ->
    gen_server:cast(proc(Host), {reload, NewOpts}).

depends(_Host, _Opts) ->
    [{mod_stream_mgmt, soft}, {mod_offline, soft}].

%% {Hook, Function, Sequence}: offline_message runs after mod_mam (49) and
%% mod_offline (50) have tagged the message.
hooks() ->
    [{disco_sm_features, disco_sm_features, 50},
     {disco_info, disco_info, 50},
     {c2s_session_pending, c2s_session_pending, 50},
     {c2s_session_resumed, c2s_session_resumed, 50},
     {c2s_copy_session, c2s_copy_session, 50},
     {c2s_handle_cast, c2s_handle_cast, 50},
     {c2s_handle_send, c2s_handle_send, 50},
     {sm_register_connection_hook, sm_register_connection_hook, 50},
     {offline_message_hook, offline_message, 55},
     {store_mam_message, mam_hook(), 50},
     {remove_user, remove_user, 50},
     %% The app server's commands when its register_host is this host.
     {user_send_packet, user_send_packet, 50},
     {adhoc_local_items, adhoc_local_items, 50}].

%% ejabberd 26.07 runs store_mam_message with 8 arguments (the last: whether the message
%% is already in a MUC archive), its mod_mam hooking store_mam_message/8 itself; older
%% releases with 7. Decided when the hooks are added or deleted, not per message.
mam_hook() ->
    _ = code:ensure_loaded(mod_mam),
    case erlang:function_exported(mod_mam, store_mam_message, 8) of
        true -> mam_message8;
        false -> mam_message
    end.

register_handlers(Host) ->
    gen_iq_handler:add_iq_handler(ejabberd_sm, Host, ?NS_PUSH_0, ?MODULE, process_iq),
    [ejabberd_hooks:add(Hook, Host, ?MODULE, Fun, Seq) || {Hook, Fun, Seq} <- hooks()].

unregister_handlers(Host) ->
    gen_iq_handler:remove_iq_handler(ejabberd_sm, Host, ?NS_PUSH_0),
    [ejabberd_hooks:delete(Hook, Host, ?MODULE, Fun, Seq) || {Hook, Fun, Seq} <- hooks()].

mod_push_configured(Host) ->
    gen_mod:is_loaded(Host, mod_push)
        orelse lists:keymember(mod_push, 1, ejabberd_option:modules(Host)).

ejabberd_running() ->
    lists:keymember(ejabberd, 1, application:which_applications()).

%%%===================================================================
%%% Options
%%%===================================================================
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
mod_opt_type(retry_delays) -> econf:list(econf:timeout(second));
mod_opt_type(db_file) -> econf:either(auto, econf:binary());
mod_opt_type(db_url) -> econf:either(undefined, econf:binary("^postgres(ql)?://"));
mod_opt_type(queue_size) -> econf:pos_int();
mod_opt_type(certfile) -> econf:either(undefined, econf:file(read));
mod_opt_type(access_backends) -> econf:acl();
mod_opt_type(endpoint_allow_ips) -> econf:list(econf:ip_mask());
mod_opt_type(backends) ->
    econf:list(
      econf:and_then(
        econf:options(
          (backend_options())#{'_' => econf:any()},  % a python provider's own options
          [{required, [type, register_host, pubsub_host]}, {return, map}, unique]),
        fun check_backend/1)).

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
%% module unless it says otherwise (Python derives the same name), and its
%% register-push-Name command must not shadow a shipped one.
check_backend(#{type := python, module := Module} = Backend) ->
    Base = filename:basename(Module),
    Name = maps:get(name, Backend, case filename:extension(Base) of
                                       <<".py">> -> filename:rootname(Base);
                                       _ -> lists:last(binary:split(Base, <<".">>, [global]))
                                   end),
    case lists:member(Name, [<<"apns">>, <<"fcm">>, <<"gcm">>, <<"webpush">>,
                             <<"mozilla">>, <<"ubuntu">>, <<"wns">>]) of
        true -> yconf:fail(yconf, {bad_enum, [python_provider_name], binary_to_atom(Name)});
        false -> maps:merge(#{app_name => <<"any">>}, Backend#{name => Name})
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
     {retry_delays, [timer:seconds(5), timer:seconds(30), timer:minutes(5)]},
     {db_file, auto},
     {db_url, undefined},
     {queue_size, 10000},
     {certfile, undefined},
     {access_backends, local},
     {endpoint_allow_ips, []},
     {backends, []}].

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
                         "spread out; beyond, ejabberd answers them with "
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

%%%===================================================================
%%% The IQ handler and hooks (run in c2s and router processes)
%%%===================================================================
%% gen_iq_handler calls this instead of xmpp:decode/1: Python gets the <enable/> as
%% the client sent it (xmpp's push_enable record keeps only one of its data forms).
decode_iq_subel(El) ->
    El.

-spec process_iq(iq()) -> ignore | iq().
process_iq(#iq{from = #jid{luser = U, lserver = S} = From, to = To, type = Type,
                lang = Lang} = IQ) ->
    Els = [xmpp:encode(El) || El <- xmpp:get_els(IQ)],
    case take_token(To#jid.lserver, {push_iqs, U, S}) of
        {wait, Seconds} ->
            xmpp:make_error(IQ, too_many(<<"push IQs">>, To#jid.lserver, Seconds, Lang));
        ok -> process_iq(IQ, From, To, Type, Lang, Els)
    end.

process_iq(IQ, From, To, Type, Lang, Els) ->
    case push_jid_malformed(Els) of
        true ->
            Text = ?T("The 'jid' of this push request is not a JID ejabberd accepts"),
            xmpp:make_error(IQ, xmpp:err_jid_malformed(Text, Lang));
        false ->
            Ref = make_ref(),
            Xml = case Els of
                      [El | _] -> xml_binary(El);
                      [] -> <<>>
                  end,
            send_iq(To#jid.lserver, IQ, Ref, {iq, Ref, jid:tolower(From),
                                              jid:tolower(jid:remove_resource(To)), Type,
                                              Lang, Xml}),
            ignore
    end.

%% The app server's JID of an enable or disable, by ejabberd's own rules (stringprep,
%% 1023 bytes a part); Python adds what those let through but no app server can be.
push_jid_malformed([#xmlel{attrs = Attrs} | _]) ->
    case fxml:get_attr(<<"jid">>, Attrs) of
        {value, <<_, _/binary>> = Jid} ->
            try jid:decode(Jid) of
                _ -> false
            catch error:_ -> true
            end;
        _ -> false
    end;
push_jid_malformed(_) ->
    false.

%% Push IQs and app-server commands of one account ({What, User, Server}): a token
%% bucket of push_iq_rate tokens refilled over a minute, shared by the account's
%% sessions. The rest is answered here, so that a flood costs Python nothing (Python
%% applies the same rule to what gets through).
-spec take_token(binary(), {atom(), binary(), binary()}) -> ok | {wait, pos_integer()}.
take_token(Host, Account) ->
    Rate = opt(Host, push_iq_rate),
    Now = erlang:monotonic_time(millisecond),
    try ets:lookup(rate_table(Host), Account) of
        Found ->
            Tokens = case Found of
                         [{_, Left, At}] -> min(Rate, Left + (Now - At) * Rate / 60000);
                         [] -> Rate
                     end,
            case Tokens >= 1 of
                true -> ets:insert(rate_table(Host), {Account, Tokens - 1, Now}), ok;
                false -> {wait, max(1, ceil((1 - Tokens) * 60 / Rate))}
            end
    catch error:badarg -> ok  % the module is stopping
    end.

too_many(What, Host, Seconds, Lang) ->
    Text = iolist_to_binary(io_lib:format(
             "too many ~ts from this account (option push_iq_rate: ~B a minute); "
             "retry in ~B s", [What, opt(Host, push_iq_rate), Seconds])),
    xmpp:err_resource_constraint(Text, Lang).

disco_sm_features(empty, From, To, Node, Lang) ->
    disco_sm_features({result, []}, From, To, Node, Lang);
disco_sm_features({result, Features}, _From, #jid{lserver = S}, <<"">>, _Lang) ->
    {result, [?NS_PUSH_0 | ios_features(S)] ++ Features};
disco_sm_features(Acc, _From, _To, _Node, _Lang) ->
    Acc.

%% Tigase's push extensions (pymod_push/core/ios_extensions.py, FEATURES), which Siskin
%% IM and Snikket iOS look for on the account.
ios_features(Host) ->
    case opt(Host, ios_extensions) of
        true -> [<<"tigase:push:encrypt:0">>, <<"tigase:push:encrypt:aes-128-gcm">>,
                 <<"tigase:push:priority:0">>, <<"tigase:push:filter:muted:0">>,
                 <<"tigase:push:filter:groupchat:0">>,
                 <<"tigase:push:filter:ignore-unknown:0">>, <<"tigase:push:jingle:0">>];
        false -> []
    end.

%% disco#info a user sends to their own bare JID: the push options form
%% (urn:xmpp:push:options) with that user's values, which Python keeps in ETS.
%% The same hook runs for the server's disco#info with (Host, Module) instead.
disco_info(Acc, #jid{luser = U, lserver = S}, #jid{luser = U, lserver = S}, <<"">>, _Lang)
  when U /= <<"">> ->
    case push_options(S, {U, S}) of
        undefined -> Acc;
        Fields ->
            Form = #xdata{type = result,
                          fields = [#xdata_field{var = <<"FORM_TYPE">>, type = hidden,
                                                 values = [<<"urn:xmpp:push:options">>]}
                                    | [#xdata_field{var = Var, type = boolean,
                                                    values = [bool_text(Value)]}
                                       || {Var, Value} <- Fields]]},
            Acc ++ [Form]
    end;
disco_info(Acc, _From, _To, _Node, _Lang) ->
    Acc.

push_options(Host, User) ->
    Table = options_table(Host),
    try ets:lookup(Table, User) of
        [{_, Fields}] -> Fields;
        [] -> case ets:lookup(Table, default) of
                  [{_, Fields}] -> Fields;
                  [] -> undefined
              end
    catch error:badarg -> undefined  % the port owner is restarting
    end.

options_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_options).

bool_text(true) -> <<"1">>;
bool_text(false) -> <<"0">>.

%% Session state keys: push_py (resume timeout to apply while pending) and
%% push_py_saved_timeout (the ordinary one, restored on resume).
c2s_session_pending(#{push_py := Timeout, mgmt_queue := Queue} = State) ->
    Queued = [describe(Pkt, State)
              || {_, _, Pkt} <- p1_queue:to_list(Queue), forwarded(Pkt)],
    notify(State, {session_pending, session_key(State), Queued}),
    Saved = mod_stream_mgmt:get_resume_timeout(State),
    mod_stream_mgmt:set_resume_timeout(State#{push_py_saved_timeout => Saved}, Timeout);
c2s_session_pending(State) ->
    State.

c2s_session_resumed(#{push_py := _, push_py_saved_timeout := Saved} = State) ->
    notify(State, {session_resumed, session_key(State)}),
    mod_stream_mgmt:set_resume_timeout(maps:remove(push_py_saved_timeout, State), Saved);
c2s_session_resumed(#{push_py := _} = State) ->
    notify(State, {session_resumed, session_key(State)}),
    State;
c2s_session_resumed(State) ->
    State.

c2s_copy_session(State, OldState) ->
    maps:merge(State, maps:with([push_py, push_py_saved_timeout, push_py_nicks], OldState)).

c2s_handle_cast(State, {?MODULE, set_push, false}) ->
    {stop, maps:remove(push_py, State)};
c2s_handle_cast(State, {?MODULE, set_push, Timeout}) ->
    {stop, State#{push_py => Timeout}};
c2s_handle_cast(State, _Msg) ->
    State.

%% The hot path: every stanza sent to every session.
c2s_handle_send(#{push_py := _, mgmt_state := pending} = State, Pkt, _Result) ->
    case forwarded(Pkt) of
        true -> notify(State, {stanza, session_key(State), describe(Pkt, State)});
        false -> ok
    end,
    State;
c2s_handle_send(State, _Pkt, _Result) ->
    State.

sm_register_connection_hook(_SID, #jid{lserver = LServer} = JID, _Info) ->
    send_event(LServer, {session_opened, jid:tolower(JID)}).

offline_message({Tag, #message{to = #jid{luser = U, lserver = S}} = Msg} = Acc)
  when Tag == offlined; Tag == archived ->
    send_event(S, {offline, {U, S}, described(Msg, U, S)}),
    Acc;
offline_message(Acc) ->
    Acc.

mam_message(#message{} = Pkt, LUser, LServer, _Peer, _Nick, chat, recv) ->
    case ejabberd_sm:get_user_resources(LUser, LServer) of
        [] -> send_event(LServer, {archived, {LUser, LServer}, described(Pkt, LUser, LServer)});
        _ -> ok  % online or pending sessions are handled by c2s_handle_send
    end,
    Pkt;
mam_message(Pkt, _LUser, _LServer, _Peer, _Nick, _Type, _Dir) ->
    Pkt.

mam_message8(Pkt, LUser, LServer, Peer, Nick, Type, Dir, _InMucArchive) ->
    mam_message(Pkt, LUser, LServer, Peer, Nick, Type, Dir).

%% Ad-hoc commands of the app server on the server's own host: ejabberd has one
%% handler per namespace (mod_adhoc's), so ours are taken out of the sender's
%% stream here and answered by Python, without making the session wait.
user_send_packet({#iq{type = set, lang = Lang,
                      to = #jid{luser = <<>>, lresource = <<>>, lserver = LServer}} = IQ,
                  #{lserver := LServer} = State} = Acc) ->
    try xmpp:get_subtag(IQ, #adhoc_command{}) of
        #adhoc_command{node = Node} ->
            case lists:keymember(Node, 1, own_host_commands(LServer, Lang)) of
                true -> gen_server:cast(proc(LServer), {route, IQ}), {drop, State};
                false -> Acc
            end;
        false -> Acc
    catch _:{xmpp_codec, _} -> Acc
    end;
%% Group chat: remember the user's nickname in each room they join (or change it
%% to), so that Python can tell a mention from the rest of the room's traffic.
user_send_packet({#presence{to = #jid{resource = Nick} = To, type = Type} = Pres,
                  State} = Acc) when Nick /= <<>> ->
    Room = jid:remove_resource(jid:tolower(To)),
    Nicks = maps:get(push_py_nicks, State, #{}),
    case Type of
        unavailable when is_map_key(Room, Nicks) ->
            {Pres, State#{push_py_nicks => maps:remove(Room, Nicks)}};
        available ->
            case is_map_key(Room, Nicks) orelse xmpp:has_subtag(Pres, #muc{}) of
                true -> {Pres, State#{push_py_nicks => Nicks#{Room => Nick}}};
                false -> Acc
            end;
        _ -> Acc
    end;
user_send_packet(Acc) ->
    Acc.

adhoc_local_items(Acc, _From, #jid{lserver = LServer} = To, Lang) ->
    case own_host_commands(LServer, Lang) of
        [] -> Acc;
        Commands ->
            Items = [#disco_item{jid = To, node = Node, name = Name} || {Node, Name} <- Commands],
            case Acc of
                {result, Old} -> {result, Old ++ Items};
                _ -> {result, Items}
            end
    end.

%% {Node, Name} of the app server's commands served on Host itself.
own_host_commands(Host, _Lang) ->
    Backends = [B || #{register_host := R} = B <- opt(Host, backends), R == Host],
    case Backends of
        [] -> [];
        _ ->
            Types = lists:usort([command_type(B) || B <- Backends]),
            Apps = fun(Group) ->
                           Names = [N || #{app_name := N} = B <- Backends,
                                         command_type(B) == Group],
                           lists:join(<<", ">>, lists:usort(Names))
                   end,
            [{<<"register-push-", Alias/binary>>,
              iolist_to_binary([<<"Register at ">>, Label, <<" (">>, Apps(Group), <<")">>])}
             || Group <- Types, {Alias, Label} <- command_aliases(Group)]
                ++ [{<<"list-push-registrations">>, <<"List push registrations">>},
                    {<<"unregister-push">>, <<"Unregister push devices">>}]
    end.

command_type(#{type := python, name := Name}) -> {python, Name};
command_type(#{type := gcm}) -> fcm;
command_type(#{type := mozilla}) -> webpush;
command_type(#{type := Type}) -> Type.

command_aliases(apns) -> [{<<"apns">>, <<"APNs">>}];
command_aliases(fcm) -> [{<<"fcm">>, <<"FCM">>}, {<<"gcm">>, <<"FCM (gcm)">>}];
command_aliases(webpush) -> [{<<"webpush">>, <<"Web Push">>},
                             {<<"mozilla">>, <<"Web Push (mozilla)">>}];
command_aliases(ubuntu) -> [{<<"ubuntu">>, <<"Ubuntu Push">>}];
command_aliases(wns) -> [{<<"wns">>, <<"WNS">>}];
command_aliases({python, Name}) -> [{Name, Name}].

remove_user(LUser, LServer) ->
    send_event(LServer, {user_removed, {LUser, LServer}}).

forwarded(#message{type = error}) -> false;
forwarded(#message{}) -> true;
forwarded(#presence{type = subscribe}) -> true;
forwarded(_) -> false.

%% A group chat message carries the user's nickname in that room as context.
describe(#message{type = groupchat, from = #jid{} = From} = Pkt, #{push_py_nicks := Nicks}) ->
    Room = jid:remove_resource(jid:tolower(From)),
    case Nicks of
        #{Room := Nick} -> erlang:append_element(describe(Pkt), #{nick => Nick});
        _ -> describe(Pkt)
    end;
describe(Pkt, #{user := U, server := S}) ->
    described(Pkt, jid:nodeprep(U), jid:nameprep(S));
describe(Pkt, _State) ->
    describe(Pkt).

%% With ios_extensions, a stanza from someone else carries the sender's roster item,
%% {Subscription, Ask} ({none, none}: none), for the ignore-unknown filter.
described(#message{type = groupchat} = Pkt, _U, _S) ->
    describe(Pkt);
described(Pkt, U, S) ->
    case xmpp:get_from(Pkt) of
        #jid{luser = U, lserver = S} -> describe(Pkt);  % the user's own (carbons)
        #jid{} = From ->
            case opt(S, ios_extensions) andalso roster_item(U, S, From) of
                {_, _} = Item -> erlang:append_element(describe(Pkt), #{roster => Item});
                _ -> describe(Pkt)  % off, or not known: Python pushes
            end;
        undefined -> describe(Pkt)
    end.

roster_item(U, S, From) ->
    case ejabberd_hooks:run_fold(roster_get_jid_info, S, {none, none, []},
                                 [U, S, jid:remove_resource(From)]) of
        {Subscription, Ask, _Groups} when is_atom(Subscription), is_atom(Ask) ->
            {Subscription, Ask};
        _ -> undefined
    end.

describe(Pkt) ->
    Body = case Pkt of
               #message{body = B} -> xmpp:get_text(B);
               _ -> <<>>
           end,
    From = case xmpp:get_from(Pkt) of
               #jid{} = JID -> jid:encode(JID);
               undefined -> <<>>
           end,
    {element(1, Pkt), From, xmpp:get_id(Pkt), xmpp:get_type(Pkt), Body,
     xml_binary(xmpp:encode(Pkt))}.

%% XML for Python. fxml:element_to_binary recurses in C on a scheduler's stack: some
%% thousands of nested elements (4,000 here) crash the VM. No stanza of any XEP nests more
%% than some ten levels: elements below the 64th level are left out, as Python would
%% refuse them (safexml.MAX_DEPTH).
xml_binary(El) ->
    case deeper_than(El, 64) of
        false -> fxml:element_to_binary(El);  % every stanza of a real client: not copied
        true -> fxml:element_to_binary(within_depth(El, 64))
    end.

deeper_than(#xmlel{}, 0) -> true;
deeper_than(#xmlel{children = Els}, Levels) -> deeper_than_any(Els, Levels - 1);
deeper_than(_, _) -> false.

deeper_than_any([El | Els], Levels) ->
    deeper_than(El, Levels) orelse deeper_than_any(Els, Levels);
deeper_than_any([], _) -> false.

within_depth(#xmlel{children = Els} = El, Levels) when Levels > 1 ->
    El#xmlel{children = [within_depth(C, Levels - 1) || C <- Els]};
within_depth(#xmlel{children = Els} = El, _) ->
    El#xmlel{children = [C || C <- Els, not is_record(C, xmlel)]};
within_depth(Other, _) ->
    Other.

session_key(#{user := U, server := S, resource := R}) ->
    jid:tolower({U, S, R}).

notify(#{lserver := LServer}, Event) ->
    send_event(LServer, Event).

%% Every event is stored in the events table before the port owner hears of it, and
%% stays there until Python has acknowledged it: what the port owner had not passed
%% on survives its crash (see recover/2). The table belongs to the keeper process.
send_event(Host, Event) ->
    Key = erlang:unique_integer([monotonic]),
    try
        ets:insert(events_table(Host), {Key, Event}),
        proc(Host) ! {event, Key}
    catch error:badarg ->
            ok  % the module is stopping, or the port owner restarting (it finds the event)
    end,
    ok.

%% The IQ waits in the table for Python's answer; its timer goes to whichever port
%% owner is registered when it runs out, so that the IQ is answered in any case.
send_iq(Host, IQ, Ref, Event) ->
    Timeout = opt(Host, reply_timeout),
    try
        ets:insert(meta_table(Host), {{iq, Ref}, IQ, erlang:monotonic_time(millisecond) + Timeout}),
        erlang:start_timer(Timeout, proc(Host), {iq, Ref})
    catch error:badarg ->
            ok
    end,
    send_event(Host, Event).

proc(Host) ->
    gen_mod:get_module_proc(Host, ?MODULE).

keeper_proc(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_keeper).

%% Events not yet acknowledged by Python, {Key, Event}, in the order of their keys.
events_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_events).

%% Token buckets of push IQs and commands per account, {Account, Tokens, Millisecond}.
rate_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_rates).

%% What the port owner must not forget: epoch, seq, the keys of each batch not
%% acknowledged ({batch, Seq}), push IQs waiting for Python ({iq, Ref}), the restart
%% count, the backoff, dropped events, and whether a Python process was running.
meta_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_meta).

%%%===================================================================
%%% ejabberdctl commands: run in the caller, answered by the Python process
%%%===================================================================
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
        result_example = "push logic /etc/ejabberd/push_logic.py reloaded: should_push"}].

push_status(Host) -> command(Host, status, []).
push_list(User, Host) -> command(Host, list, [User, Host]).
push_delete(User, Host, Node) -> command(Host, delete, [User, Host, Node]).
push_test(User, Host) -> command(Host, test, [User, Host]).
push_wake_all(Host) -> command(Host, wake_all, []).
push_delete_old(Host, Days) -> command(Host, delete_old, [integer_to_binary(Days)]).
push_reload_logic(Host) -> command(Host, reload_logic, []).

command(Host, Name, Args) ->
    LHost = jid:nameprep(Host),
    try gen_server:call(proc(LHost), {command, Name, Args}, timer:seconds(30)) of
        Text -> unicode:characters_to_list(Text)
    catch exit:{noproc, _} -> "mod_push_py is not running on " ++ binary_to_list(Host);
          exit:{timeout, _} -> "the Python process did not answer within 30 s";
          exit:{Why, _} ->
            lists:flatten(io_lib:format("mod_push_py's port owner ended (~p): try again", [Why]))
    end.

ask_python(Name, Args, From, #state{commands = Commands} = State) ->
    Ref = make_ref(),
    push_event({command, Ref, Name, Args},
               State#state{commands = Commands#{Ref => {Name, From}}}).

%% What the shim knows itself: everything when Python cannot answer.
shim_status(#state{status = Status, info = Info, up_since = Since} = State) ->
    Process = case Status of
                  up -> io_lib:format("Python process up since ~ts (pid ~ts, pymod_push ~ts)",
                                      [calendar:system_time_to_rfc3339(Since),
                                       maps:get(pid, Info, <<"?">>),
                                       maps:get(version, Info, <<"?">>)]);
                  _ -> io_lib:format("Python process ~ts", [Status])
              end,
    iolist_to_binary(
      io_lib:format("~ts; restarted ~B time(s); events waiting: ~B held, ~B unacknowledged; "
                    "dropped: ~B", [Process, State#state.restarts, State#state.held_len,
                                    State#state.unacked_len, State#state.dropped])).

%%%===================================================================
%%% The port owner
%%%===================================================================
start_link(Host, Opts) ->
    gen_server:start_link({local, proc(Host)}, ?MODULE, [Host, Opts], []).

%% The keeper: it only owns the tables, so that they outlive the port owner.
init([Host, keeper]) ->
    ets:new(events_table(Host), [named_table, ordered_set, public, {write_concurrency, true}]),
    ets:new(meta_table(Host), [named_table, public, {write_concurrency, true}]),
    ets:new(rate_table(Host), [named_table, public, {write_concurrency, true}]),
    ets:insert(meta_table(Host), [{epoch, erlang:system_time(microsecond)}, {seq, 0},
                                  {restarts, 0}, {backoff, ?MIN_BACKOFF}, {dropped, 0}]),
    {ok, {keeper, Host}};
init([Host, _Opts]) ->
    process_flag(trap_exit, true),
    [ejabberd_router:register_route(Domain, Host) || Domain <- app_server_domains(Host)],
    ets:new(options_table(Host), [named_table, protected, {read_concurrency, true}]),
    erlang:send_after(?LOGLEVEL_CHECK, self(), check_loglevel),
    erlang:send_after(?RATE_FORGET, self(), forget_rates),
    Meta = meta_table(Host),
    [Epoch, Seq, Restarts, Backoff, Dropped] =
        [ets:lookup_element(Meta, Key, 2) || Key <- [epoch, seq, restarts, backoff, dropped]],
    State = #state{host = Host, epoch = Epoch, seq = Seq, restarts = Restarts,
                   backoff = Backoff, dropped = Dropped, queue_size = opt(Host, queue_size),
                   loglevel = ejabberd_logger:get()},
    case ets:lookup(Meta, python) of
        [] -> {ok, open(State)};
        [{python, Running}] -> {ok, recover(Running, State)}
    end.

%% A port owner before this one crashed or was killed, and its Python process ends with
%% it (stdin closed). What it had not got acknowledged is in the tables: its batches go
%% to the next Python process as they were (same epoch and seq), then the events it had
%% not written yet, in order. The restart is counted and waits for the backoff, as when
%% Python dies, which also lets the old process finish its last commit.
recover(Running, #state{host = Host, backoff = Backoff, restarts = Restarts} = State) ->
    Meta = meta_table(Host),
    Events = ets:tab2list(events_table(Host)),
    Found = maps:from_list(Events),
    Batches = lists:sort(ets:select(Meta, [{{{batch, '$1'}, '$2'}, [], [{{'$1', '$2'}}]}])),
    InBatches = maps:from_list([{Key, true} || {_, Keys} <- Batches, Key <- Keys]),
    Unacked = [{Seq, [{Key, maps:get(Key, Found)} || Key <- Keys, is_map_key(Key, Found)]}
               || {Seq, Keys} <- Batches],
    Held = [Event || {Key, _} = Event <- Events, not is_map_key(Key, InBatches)],
    Now = erlang:monotonic_time(millisecond),
    [erlang:start_timer(max(0, Deadline - Now), self(), {iq, Ref})
     || [Ref, Deadline] <- ets:match(Meta, {{iq, '$1'}, '_', '$2'})],
    Restarts1 = case Running of
                    true -> Restarts + 1;
                    false -> Restarts  % counted when it exited
                end,
    ?WARNING_MSG("mod_push_py: the port owner restarted on ~ts; ~B event(s) not "
                 "acknowledged and ~B not yet sent are kept, Python starts in ~B ms",
                 [Host, length(Events) - length(Held), length(Held), Backoff]),
    erlang:send_after(Backoff, self(), restart),
    keep(State#state{status = down, restarts = Restarts1,
                     backoff = min(Backoff * 2, ?MAX_BACKOFF),
                     unacked = queue:from_list(Unacked),
                     unacked_len = length(Events) - length(Held),
                     held = queue:from_list(Held), held_len = length(Held),
                     recovered = maps:from_list([{Key, true} || {Key, _} <- Events])},
         false).

%% The counters in the meta table, and whether a Python process runs.
keep(#state{host = Host} = State, Running) ->
    ets:insert(meta_table(Host), [{restarts, State#state.restarts},
                                  {backoff, State#state.backoff},
                                  {dropped, State#state.dropped}, {python, Running}]),
    State.

%% Subdomains served by the app server (its pubsub and registration hosts).
app_server_domains(Host) ->
    lists:usort([D || #{pubsub_host := P, register_host := R} <- opt(Host, backends),
                      D <- [P, R], D /= Host]).

handle_call({command, Name, Args}, From, #state{status = up} = State) ->
    {noreply, ask_python(Name, Args, From, State)};
handle_call({command, _Name, _Args}, _From, State) ->
    {reply, shim_status(State), State};
handle_call(_Request, _From, State) ->
    {reply, {error, badarg}, State}.

handle_cast({route, Pkt}, State) ->
    {noreply, route_to_app_server(Pkt, State)};
handle_cast({reload, _NewOpts}, #state{port = Port} = State) ->
    %% The new options reach Python with the next handshake.
    ?INFO_MSG("mod_push_py: options changed, restarting the Python process", []),
    try port_close(Port) catch error:badarg -> true end,
    {noreply, open(State#state{port = undefined, backoff = ?MIN_BACKOFF})};
handle_cast(_Msg, {keeper, _} = State) ->
    {noreply, State};
handle_cast(Msg, State) ->
    ?WARNING_MSG("Unexpected cast: ~p", [Msg]),
    {noreply, State}.

handle_info({event, Key}, #state{host = Host, recovered = Recovered} = State) ->
    case Recovered of
        #{Key := _} ->  % queued already when this process started
            {noreply, State#state{recovered = maps:remove(Key, Recovered)}};
        _ ->
            case ets:lookup(events_table(Host), Key) of
                [Event] -> {noreply, take_event(Event, State)};
                [] -> {noreply, State}
            end
    end;
handle_info({Port, {data, Bin}}, #state{port = Port} = State) ->
    case decode(Bin) of
        {ok, Term} -> {noreply, handle_python(Term, State)};
        error ->
            ?ERROR_MSG("mod_push_py: malformed frame from Python (~B bytes), "
                       "ignored", [byte_size(Bin)]),
            {noreply, State}
    end;
handle_info({Port, {exit_status, Status}}, #state{port = Port, status = disabled} = State) ->
    ?INFO_MSG("mod_push_py: Python process exited with status ~B", [Status]),
    {noreply, keep(State#state{port = undefined}, false)};
handle_info({Port, {exit_status, Status}}, #state{port = Port, backoff = Backoff} = State) ->
    Hint = case State#state.status of
               starting -> io_lib:format(" before its handshake: check that '~ts -m pymod_push' "
                                         "runs as the ejabberd user",
                                         [opt(State#state.host, python)]);
               _ -> ""
           end,
    ?ERROR_MSG("mod_push_py: Python process exited with status ~B~ts; "
               "restarting it in ~B ms", [Status, Hint, Backoff]),
    erlang:send_after(Backoff, self(), restart),
    {noreply, keep(State#state{port = undefined, status = down,
                               ack_timer = cancel_ack_timer(State),
                               held = queue:join(queue:from_list(lists:reverse(State#state.batch)),
                                                 State#state.held),
                               held_len = State#state.held_len + length(State#state.batch),
                               batch = [], restarts = State#state.restarts + 1,
                               backoff = min(Backoff * 2, ?MAX_BACKOFF)}, false)};
handle_info(restart, #state{port = undefined, status = down} = State) ->
    %% Messages for events found at the start were handled long ago.
    {noreply, open(State#state{recovered = #{}})};
handle_info({ack_timeout, Seq}, #state{port = Port, status = up,
                                       unacked = Unacked} = State) when is_port(Port) ->
    case queue:peek(Unacked) of
        {value, {Seq, _}} ->
            ?ERROR_MSG("mod_push_py: the Python process has not handled an event batch "
                       "for ~B s; killing it (it is restarted and gets the batch again)",
                       [?ACK_TIMEOUT div 1000]),
            case erlang:port_info(Port, os_pid) of
                {os_pid, OsPid} -> os:cmd("kill -9 " ++ integer_to_list(OsPid));
                undefined -> ok
            end,
            {noreply, State#state{ack_timer = undefined}};
        _ ->
            {noreply, State}
    end;
handle_info({ack_timeout, _}, State) ->
    {noreply, State};
handle_info({route, Pkt}, State) ->
    {noreply, route_to_app_server(Pkt, State)};
handle_info(check_loglevel, #state{loglevel = Old} = State) ->
    erlang:send_after(?LOGLEVEL_CHECK, self(), check_loglevel),
    case ejabberd_logger:get() of
        Old -> {noreply, State};
        New -> {noreply, push_event({loglevel, New}, State#state{loglevel = New})}
    end;
handle_info(forget_rates, #state{host = Host} = State) ->
    erlang:send_after(?RATE_FORGET, self(), forget_rates),
    Idle = erlang:monotonic_time(millisecond) - ?RATE_FORGET,
    try ets:select_delete(rate_table(Host), [{{'_', '_', '$1'}, [{'<', '$1', Idle}], [true]}])
    catch error:badarg -> ok  % code loaded into a running module: no table until restart
    end,
    {noreply, State};
handle_info(flush, State) ->
    {noreply, flush(State)};
handle_info({iq_reply, Reply, Ref}, State) ->
    {noreply, push_event({iq_reply, Ref, publish_outcome(Reply)}, State)};
handle_info({timeout, _TRef, {iq, Ref}}, #state{host = Host} = State) ->
    case ets:take(meta_table(Host), {iq, Ref}) of
        [{_, IQ, _}] ->
            ?WARNING_MSG("mod_push_py: no answer from Python within the reply "
                         "timeout, answering a push IQ with an error", []),
            Txt = ?T("The push service did not answer in time"),
            ejabberd_router:route_error(IQ, xmpp:err_internal_server_error(Txt, IQ#iq.lang));
        [] ->
            ok
    end,
    {noreply, State};
handle_info({'EXIT', Port, Reason}, #state{port = Port} = State) ->
    %% The port went without its exit_status (which comes first when there is one).
    ?ERROR_MSG("mod_push_py: the port to Python closed: ~p", [Reason]),
    handle_info({Port, {exit_status, -1}}, State);
handle_info({'EXIT', _, _}, State) ->
    {noreply, State};
handle_info(_Info, {keeper, _} = State) ->
    {noreply, State};
handle_info(Info, State) ->
    ?WARNING_MSG("Unexpected info: ~p", [Info]),
    {noreply, State}.

terminate(_Reason, {keeper, _}) ->
    ok;
terminate(_Reason, #state{host = Host, port = Port}) ->
    [ejabberd_router:unregister_route(Domain) || Domain <- app_server_domains(Host)],
    try port_close(Port) catch error:badarg -> true end,
    ok.

code_change(_OldVsn, State, _Extra) ->
    {ok, State}.

open(#state{host = Host} = State0) ->
    State = State0#state{queue_size = opt(Host, queue_size)},
    Python = opt(Host, python),
    %% -P: the working directory (the spool) is not put on sys.path, so that no file
    %% there can shadow a module (Python >= 3.11, which pymod_push requires).
    try open_port({spawn_executable, Python},
                  [{args, ["-P", "-m", "pymod_push"]}, {packet, 4}, binary,
                   exit_status, use_stdio, hide, {cd, spool_dir()}]) of
        Port ->
            write(Port, hello(Host)),
            keep(State#state{port = Port, status = starting}, true)
    catch error:Why ->
            ?ERROR_MSG("mod_push_py: cannot start ~ts -m pymod_push: ~p; "
                       "retrying in ~B ms", [Python, Why, State#state.backoff]),
            erlang:send_after(State#state.backoff, self(), restart),
            keep(State#state{port = undefined, status = down,
                             backoff = min(State#state.backoff * 2, ?MAX_BACKOFF)}, false)
    end.

%% A port that is closing (Python just died) refuses the write: its exit_status is
%% on its way, and what was written goes again to the next Python process.
write(Port, Term) ->
    try port_command(Port, term_to_binary(Term))
    catch error:badarg -> false
    end.

hello(Host) ->
    Opts = maps:from_list(
             [{Opt, opt(Host, Opt)} || {Opt, _} <- mod_options(Host), Opt /= access_backends]),
    {hello, ?PROTOCOL_VERSION, Host,
     Opts#{spool_dir => unicode:characters_to_binary(spool_dir()), node => node(),
           loglevel => ejabberd_logger:get(), max_ack_queue => max_ack_queue(Host)}}.

%% How many stanzas mod_stream_mgmt lets a session hold unacknowledged (it ends the
%% session beyond): Python remembers no more pushed messages per pending session.
%% ejabberd's default for infinity or without the module.
max_ack_queue(Host) ->
    try gen_mod:get_module_opt(Host, mod_stream_mgmt, max_ack_queue) of
        N when is_integer(N), N > 0 -> N;
        _ -> 5000
    catch _:_ -> 5000
    end.

opt(Host, Opt) ->
    gen_mod:get_module_opt(Host, ?MODULE, Opt).

spool_dir() ->
    mnesia:system_info(directory).

decode(Bin) ->
    try {ok, binary_to_term(Bin, [safe])}
    catch error:badarg -> error
    end.

%% A stanza for the app server (commands, publishes, disco). Whether the sender
%% may use the built-in app server is an ejabberd access rule, decided here.
route_to_app_server(#iq{from = #jid{luser = U, lserver = S}, lang = Lang} = IQ,
                    #state{host = Host} = State) when U /= <<>> ->
    case xmpp:has_subtag(IQ, #adhoc_command{}) andalso
        take_token(Host, {commands, U, S}) of
        {wait, Seconds} ->
            Error = too_many(<<"registration commands">>, Host, Seconds, Lang),
            ejabberd_router:route(xmpp:make_error(IQ, Error)),
            State;
        _ -> push_app_server_iq(IQ, State)
    end;
route_to_app_server(#iq{} = IQ, State) ->
    push_app_server_iq(IQ, State);
route_to_app_server(_Pkt, State) ->
    State.  % messages and presences to the app server are not answered

push_app_server_iq(#iq{from = From} = IQ, #state{host = Host} = State) ->
    Allowed = may_use_backends(Host, opt(Host, access_backends), From),
    push_event({app_server_iq, Allowed, xml_binary(xmpp:encode(IQ))}, State).

%% access_backends: 'local' (the default) is a user of one of this server's virtual hosts,
%% whether or not the configuration defines an access rule of that name (ejabberd has
%% none built in, and a rule it does not know denies); any other value is an access rule
%% ('all': anyone, accounts of other servers included).
may_use_backends(_Host, local, #jid{luser = U, lserver = S}) ->
    U /= <<>> andalso ejabberd_router:is_my_host(S);
may_use_backends(Host, Rule, From) ->
    acl:match_rule(Host, Rule, From) == allow.

publish_outcome(timeout) -> timeout;
publish_outcome(#iq{type = result}) -> result;
publish_outcome(#iq{type = error} = IQ) ->
    case xmpp:get_error(IQ) of
        #stanza_error{type = Type, reason = Reason} when is_atom(Reason) ->
            {error, Type, Reason};
        #stanza_error{type = Type, reason = Reason} when is_tuple(Reason) ->
            {error, Type, element(1, Reason)};
        _ ->
            {error, cancel, 'undefined-condition'}
    end.

%% An event of the port owner's own, stored like the hooks' (send_event/2).
push_event(Event, #state{host = Host} = State) ->
    Key = erlang:unique_integer([monotonic]),
    ets:insert(events_table(Host), {Key, Event}),
    take_event({Key, Event}, State).

%% Events are batched: a frame carries every event that arrived while the
%% owner was busy, so a burst costs one port write instead of one per event.
take_event({Key, _}, #state{status = disabled} = State) ->
    forget([Key], State);  % the version mismatch was logged; IQs get their timeout error
take_event(Event, #state{status = up, held_len = 0, unacked_len = Unacked,
                         queue_size = Max} = State) when Unacked < Max ->
    batch_event(Event, State);
take_event(Event, State) ->
    hold_event(Event, State).  % Python is down or far behind: keep it here, bounded

forget(Keys, #state{host = Host} = State) ->
    Table = events_table(Host),
    lists:foreach(fun(Key) -> ets:delete(Table, Key) end, Keys),
    State.

batch_event(Event, #state{batch = Batch} = State) ->
    State1 = State#state{batch = [Event | Batch]},
    case length(Batch) + 1 >= ?MAX_BATCH orelse mailbox_empty() of
        true -> flush(State1);
        false when Batch == [] ->
            %% More messages are waiting; they may not be events (port data, timers),
            %% so make sure this batch is written once they are handled.
            self() ! flush,
            State1;
        false -> State1
    end.

hold_event(Event, #state{held_len = Len, queue_size = Max} = State) ->
    case Len < Max of
        true ->
            State#state{held = queue:in(Event, State#state.held), held_len = Len + 1};
        false ->
            Dropped = State#state.dropped + 1,
            ?ERROR_MSG("mod_push_py: Python process unavailable and event queue "
                       "full (~B); dropped an event (~B dropped so far)",
                       [Len, Dropped]),
            ets:insert(meta_table(State#state.host), {dropped, Dropped}),
            forget([element(1, Event)], State#state{dropped = Dropped})
    end.

%% Events kept while Python was down or behind, oldest first, as far as there is room;
%% written in full batches.
release_held(#state{status = up, unacked_len = Unacked, queue_size = Max,
                    held = Held, held_len = Len, batch = Batch} = State)
  when Len > 0, Unacked < Max ->
    {{value, Event}, Rest} = queue:out(Held),
    State1 = State#state{batch = [Event | Batch], held = Rest, held_len = Len - 1},
    release_held(case length(Batch) + 1 >= ?MAX_BATCH of
                     true -> flush(State1);
                     false -> State1
                 end);
release_held(State) ->
    flush(State).

mailbox_empty() ->
    {message_queue_len, 0} == process_info(self(), message_queue_len).

flush(#state{batch = []} = State) ->
    State;
flush(#state{batch = Batch, seq = Seq, unacked = Unacked, unacked_len = Len} = State) ->
    Events = lists:reverse(Batch),
    %% Recorded before the write: a successor sends it again with the same seq.
    ets:insert(meta_table(State#state.host),
               [{seq, Seq + 1}, {{batch, Seq + 1}, [Key || {Key, _} <- Events]}]),
    State1 = write_batch({Seq + 1, Events}, State),
    State1#state{batch = [], seq = Seq + 1, unacked = queue:in({Seq + 1, Events}, Unacked),
                 unacked_len = Len + length(Events)}.

write_batch({Seq, Events}, #state{port = Port, epoch = Epoch} = State) ->
    write(Port, {events, Epoch, Seq, [Event || {_, Event} <- Events]}),
    case State#state.ack_timer of
        undefined ->
            State#state{ack_timer = erlang:send_after(?ACK_TIMEOUT, self(), {ack_timeout, Seq})};
        _ -> State
    end.

%% Python committed everything up to Seq.
acknowledge(Seq, #state{unacked = Unacked, unacked_len = Len} = State) ->
    case queue:peek(Unacked) of
        {value, {S, Events}} when S =< Seq ->
            %% The events first: a batch record without them is harmless.
            forget([Key || {Key, _} <- Events], State),
            ets:delete(meta_table(State#state.host), {batch, S}),
            acknowledge(Seq, State#state{unacked = queue:drop(Unacked),
                                         unacked_len = Len - length(Events)});
        {value, {Next, _}} ->
            cancel_ack_timer(State),
            State#state{ack_timer = erlang:send_after(?ACK_TIMEOUT, self(), {ack_timeout, Next})};
        empty ->
            State#state{ack_timer = cancel_ack_timer(State)}
    end.

cancel_ack_timer(#state{ack_timer = undefined}) -> undefined;
cancel_ack_timer(#state{ack_timer = TRef}) -> erlang:cancel_timer(TRef), undefined.

%% The handshake reply, then lists of actions.
handle_python({hello, ?PROTOCOL_VERSION, Info}, #state{status = starting} = State0) ->
    ?INFO_MSG("mod_push_py: Python process ready on ~ts: ~p", [State0#state.host, Info]),
    State = State0#state{info = Info, up_since = erlang:system_time(second)},
    %% What the previous process did not acknowledge goes first, as it was: Python
    %% skips a batch whose effects it had committed.
    State1 = lists:foldl(fun write_batch/2,
                         keep(State#state{status = up, backoff = ?MIN_BACKOFF}, true),
                         queue:to_list(State#state.unacked)),
    release_held(State1);
handle_python({hello, Version, _Info}, #state{status = starting} = State) ->
    ?ERROR_MSG("mod_push_py: protocol version mismatch on ~ts: this module speaks "
               "version ~B, the Python package at ~ts speaks ~p. Install matching "
               "versions of the Erlang module and the Python package, then "
               "restart the module. Push notifications are disabled until then.",
               [State#state.host, ?PROTOCOL_VERSION,
                opt(State#state.host, python), Version]),
    %% Python exits by itself after its reply; that exit is not restarted.
    forget([Key || {Key, _} <- queue:to_list(State#state.held)],
           State#state{status = disabled, held = queue:new(), held_len = 0});
handle_python(Actions, #state{status = up} = State) when is_list(Actions) ->
    lists:foldl(fun execute/2, State, Actions);
handle_python({log, _, _} = Log, State) ->  % Python may log before its hello
    execute(Log, State);
handle_python(Other, State) ->
    ?ERROR_MSG("mod_push_py: unexpected frame from Python: ~P", [Other, 10]),
    State.

execute({iq_result, Ref, Xml}, State) ->
    answer_iq(Ref, fun(IQ) -> xmpp:make_iq_result(IQ, parse_xml(Xml)) end, State);
execute({iq_error, Ref, Type, Reason, Text}, State) ->
    answer_iq(Ref, fun(IQ) ->
                           Err = #stanza_error{type = Type, reason = Reason,
                                               text = xmpp:mk_text(Text, IQ#iq.lang)},
                           xmpp:make_error(IQ, Err)
                   end, State);
execute({publish, Ref, To, Node, Fields, Options, Timeout}, State) ->
    execute({publish, Ref, To, Node, Fields, Options, Timeout, []}, State);
execute({publish, Ref, To, Node, Fields, Options, Timeout, Elements},
        #state{host = Host} = State) ->
    try jid:decode(To) of
        AppServer ->
            Item = #ps_item{sub_els = [notification(Fields, Elements)]},
            PubSub = #pubsub{publish = #ps_publish{node = Node, items = [Item]},
                             publish_options = xdata(Options)},
            IQ = #iq{type = set, from = jid:make(Host), to = AppServer, sub_els = [PubSub]},
            ejabberd_router:route_iq(IQ, Ref, self(), Timeout),
            State
    catch error:{bad_jid, _} ->  % answered as the router would answer it
            push_event({iq_reply, Ref, {error, cancel, 'jid-malformed'}}, State)
    end;
execute({route, Xml}, State) ->
    ejabberd_router:route(xmpp:decode(parse_xml(Xml), ?NS_CLIENT, [ignore_els])),
    State;
execute({set_push, {U, S, R}, Value}, State) ->
    case ejabberd_sm:get_session_pid(U, S, R) of
        Pid when is_pid(Pid) -> ejabberd_c2s:cast(Pid, {?MODULE, set_push, Value});
        none -> ok
    end,
    State;
execute({push_options, Key, undefined}, #state{host = Host} = State) ->
    ets:delete(options_table(Host), Key),
    State;
execute({push_options, Key, Fields}, #state{host = Host} = State) ->
    ets:insert(options_table(Host), {Key, Fields}),
    State;
execute({command_result, Ref, Text}, #state{commands = Commands} = State) ->
    case maps:take(Ref, Commands) of
        {{Name, From}, Commands1} ->
            Shim = case Name of  % the status has the shim's part first
                       status -> [shim_status(State), "\n"];
                       _ -> []
                   end,
            gen_server:reply(From, iolist_to_binary([Shim, Text])),
            State#state{commands = Commands1};
        error -> State
    end;
execute({ack, Seq}, State) ->
    release_held(acknowledge(Seq, State));
execute({log, Level, Text}, State) ->
    log(Level, Text),
    State;
execute(Action, State) ->
    ?WARNING_MSG("mod_push_py: unknown action from Python ignored: ~P", [Action, 10]),
    State.

answer_iq(Ref, MakeReply, #state{host = Host} = State) ->
    case ets:take(meta_table(Host), {iq, Ref}) of
        [{_, IQ, _}] -> ejabberd_router:route(MakeReply(IQ));
        [] -> ok  % already answered with a timeout error
    end,
    State.

%% <notification/>: the summary form, and after it the extension elements Python made
%% (Tigase's <encrypted/>, <priority/>, <jingle/>), if any.
notification(Fields, []) ->
    #push_notification{xdata = xdata(Fields)};
notification(Fields, Elements) ->
    Form = case Fields of
               [] -> [];
               _ -> [xmpp:encode(xdata(Fields))]
           end,
    #xmlel{name = <<"notification">>, attrs = [{<<"xmlns">>, ?NS_PUSH_0}],
           children = Form ++ [parse_xml(E) || E <- Elements]}.

%% A submitted data form from [{Var, [Value]}]; FORM_TYPE is hidden (XEP-0068).
xdata(undefined) -> undefined;
xdata(Fields) ->
    #xdata{type = submit,
           fields = [#xdata_field{var = Var, values = Values,
                                  type = case Var of <<"FORM_TYPE">> -> hidden; _ -> undefined end}
                     || {Var, Values} <- Fields]}.

parse_xml(undefined) -> undefined;
parse_xml(Xml) -> fxml_stream:parse_element(Xml).

log(debug, Text) -> ?DEBUG("~ts", [Text]);
log(info, Text) -> ?INFO_MSG("~ts", [Text]);
log(notice, Text) -> ?INFO_MSG("~ts", [Text]);
log(warning, Text) -> ?WARNING_MSG("~ts", [Text]);
log(error, Text) -> ?ERROR_MSG("~ts", [Text]);
log(_, Text) -> ?CRITICAL_MSG("~ts", [Text]).
