%%%----------------------------------------------------------------------
%%% mod_push_py: XEP-0357 push notifications, decided by a Python process.
%%%
%%% This module makes no push decisions. It forwards session, stanza and
%%% IQ events to `python -m pymod_push' over an Erlang port ({packet,4},
%%% External Term Format) and executes the actions Python sends back.
%%% The port protocol is documented in docs/protocol.md of pymod_push.
%%%
%%% The shim is seven modules, like ejabberd's own mod_push family:
%%%   mod_push_py       gen_mod, the hooks, the push IQ handler, disco, the app
%%%                     server's ad-hoc command items, the HTTP request handler (this file)
%%%   mod_push_py_port  the port owner (a gen_server) and its keeper: the port to
%%%                     Python, batching, held events, acknowledgements, Python's
%%%                     actions, the ETS tables
%%%   mod_push_py_opt   the options, their defaults and their documentation
%%%   mod_push_py_actions  what Python's actions make, without state (the publish's XML)
%%%   mod_push_py_muc   the absent room members of each group chat message
%%%   mod_push_py_up    UnifiedPush: the register IQ, the HTTP endpoints, deliveries
%%%   mod_push_py_commands  the ejabberdctl commands
%%% 'ejabberdctl module_install mod_push_py' compiles and installs all seven.
%%%
%%% Copyright (C) 2026 the pymod_push authors. GPL-2.0-or-later.
%%%----------------------------------------------------------------------
-module(mod_push_py).
-behaviour(gen_mod).

-protocol({xep, 357, '0.4.1'}).
%% The pymod_push release this shim comes from ('pymod-push doctor' compares it with the
%% Python package's; tests/unit/test_install_cli.py keeps it equal to pymod_push.__version__).
-vsn("0.1.0").

%% gen_mod; ext_mod calls pre_uninstall/0 (module_uninstall, module_upgrade)
-export([start/2, stop/1, reload/3, depends/2,
         mod_options/1, mod_opt_type/1, mod_doc/0, pre_uninstall/0]).
%% hooks and the IQ handler
-export([ejabberd_started/0, decode_iq_subel/1, process_iq/1, disco_sm_features/5,
         disco_info/5, user_send_packet/1,
         adhoc_local_items/4,
         c2s_session_pending/1, c2s_session_resumed/1, c2s_copy_session/2,
         c2s_handle_cast/2, c2s_handle_send/3,
         sm_register_connection_hook/3, offline_message/1, mam_message/7, mam_message8/8,
         remove_user/2]).
%% ejabberd_http request handler (UnifiedPush endpoints: mod_push_py_up)
-export([process/2]).
%% for mod_push_py_port: ejabberd's rules on commands to the app server (the rate,
%% access_backends), XML for Python
-export([take_token/2, too_many/4, may_use_backends/3, xml_binary/1]).

-include("xmpp.hrl").
-include("logger.hrl").
-include("translate.hrl").

-import(mod_push_py_opt, [opt/2]).
-import(mod_push_py_port, [send_event/2, proc/1]).

-type c2s_state() :: ejabberd_c2s:state().

%%%===================================================================
%%% gen_mod
%%%===================================================================
-spec start(binary(), gen_mod:opts()) -> ok | {error, term()}.
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
            case mod_push_py_port:start_processes(Host, Opts) of
                {ok, _} ->
                    register_handlers(Host),
                    mod_push_py_muc:start(Host),
                    mod_push_py_up:start(Host),
                    ejabberd_commands:register_commands(
                      ?MODULE, mod_push_py_commands:get_commands_spec()),
                    %% At boot, Python learns when start-up is complete (restart recovery);
                    %% the hook runs only then, not when the module starts later.
                    ejabberd_hooks:add(ejabberd_started, ?MODULE, ejabberd_started, 50),
                    ok;
                Err -> Err
            end
    end.

-spec stop(binary()) -> ok | {error, term()}.
stop(Host) ->
    %% The port owner's name (mod_push_py_port:proc/1), without calling that module: ext_mod
    %% stops the module again after pre_uninstall/0, which must not load it again.
    case whereis(gen_mod:get_module_proc(Host, ?MODULE)) of
        undefined -> ok;  % inert: nothing of ours is registered
        _ ->
            unregister_handlers(Host),
            mod_push_py_muc:stop(Host),
            mod_push_py_up:stop(Host),
            ejabberd_hooks:delete(ejabberd_started, ?MODULE, ejabberd_started, 50),
            gen_mod:is_loaded_elsewhere(Host, ?MODULE)
                orelse ejabberd_commands:unregister_commands(
                         mod_push_py_commands:get_commands_spec()),
            mod_push_py_port:stop_processes(Host)
    end.

%% ejabberd has booted: the sessions it had before are gone (global hook, run once).
-spec ejabberd_started() -> ok.
ejabberd_started() ->
    [send_event(Host, {ejabberd_started})
     || Host <- ejabberd_option:hosts(), gen_mod:is_loaded(Host, ?MODULE)],
    ejabberd_hooks:delete(ejabberd_started, ?MODULE, ejabberd_started, 50).

-spec reload(binary(), gen_mod:opts(), gen_mod:opts()) -> ok.
reload(Host, NewOpts, _OldOpts) ->
    mod_push_py_muc:stop(Host),
    mod_push_py_muc:start(Host),  % groupchat_pushes as it is now
    mod_push_py_up:stop(Host),
    mod_push_py_up:start(Host),  % unified_push_url as it is now
    gen_server:cast(proc(Host), {reload, NewOpts}).

-spec depends(binary(), gen_mod:opts()) -> [{module(), hard | soft}].
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


%% ext_mod unloads mod_push_py alone when it uninstalls or upgrades the module: the
%% other modules are stopped and unloaded here (as ext_mod does with this one), so
%% that module_upgrade runs the new code of all seven.
-spec pre_uninstall() -> ok.
pre_uninstall() ->
    [try gen_mod:stop_module(Host, ?MODULE) catch _:_ -> ok end
     || Host <- ejabberd_option:hosts()],
    lists:foreach(fun(Module) -> code:purge(Module), code:delete(Module) end,
                  [mod_push_py_port, mod_push_py_opt, mod_push_py_actions, mod_push_py_muc,
                   mod_push_py_up, mod_push_py_commands]).

%% gen_mod asks this module; the options live in mod_push_py_opt.
-spec mod_opt_type(atom()) -> econf:validator().
mod_opt_type(Opt) -> mod_push_py_opt:mod_opt_type(Opt).

-spec mod_options(binary()) -> [{atom(), term()}].
mod_options(Host) -> mod_push_py_opt:mod_options(Host).

-spec mod_doc() -> map().
mod_doc() -> mod_push_py_opt:mod_doc().

%% ejabberd_http's request handler (request_handlers: {"/up": mod_push_py}): the
%% UnifiedPush endpoints, answered in the HTTP connection's process.
-spec process([binary()], tuple()) -> {pos_integer(), binary(), [{binary(), binary()}], binary()}.
process(LocalPath, Request) ->
    mod_push_py_up:process(LocalPath, Request).

%%%===================================================================
%%% The IQ handler and hooks (run in c2s and router processes)
%%%===================================================================
%% gen_iq_handler calls this instead of xmpp:decode/1: Python gets the <enable/> as
%% the client sent it (xmpp's push_enable record keeps only one of its data forms).
-spec decode_iq_subel(xmlel() | xmpp_element()) -> xmlel() | xmpp_element().
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
            mod_push_py_port:send_iq(To#jid.lserver, IQ, Ref, {iq, Ref, jid:tolower(From),
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
%% sessions. The rest is answered here, so that a flood costs Python nothing (Python has
%% no copy of this rule).
-spec take_token(binary(), {atom(), binary(), binary()}) -> ok | {wait, pos_integer()}.
take_token(Host, Account) ->
    Rate = opt(Host, push_iq_rate),
    Now = erlang:monotonic_time(millisecond),
    Table = mod_push_py_port:rate_table(Host),
    try ets:lookup(Table, Account) of
        Found ->
            Tokens = case Found of
                         [{_, Left, At}] -> min(Rate, Left + (Now - At) * Rate / 60000);
                         [] -> Rate
                     end,
            case Tokens >= 1 of
                true -> ets:insert(Table, {Account, Tokens - 1, Now}), ok;
                false -> {wait, max(1, ceil((1 - Tokens) * 60 / Rate))}
            end
    catch error:badarg -> ok  % the module is stopping
    end.

-spec too_many(binary(), binary(), pos_integer(), binary()) -> stanza_error().
too_many(What, Host, Seconds, Lang) ->
    Text = iolist_to_binary(io_lib:format(
             "too many ~ts from this account (option push_iq_rate: ~B a minute); "
             "retry in ~B s", [What, opt(Host, push_iq_rate), Seconds])),
    xmpp:err_resource_constraint(Text, Lang).

%% access_backends: 'local' (the default) is a user of one of this server's virtual hosts,
%% whether or not the configuration defines an access rule of that name (ejabberd has
%% none built in, and a rule it does not know denies); any other value is an access rule
%% ('all': anyone, accounts of other servers included).
-spec may_use_backends(binary(), atom(), jid()) -> boolean().
may_use_backends(_Host, local, #jid{luser = U, lserver = S}) ->
    U /= <<>> andalso ejabberd_router:is_my_host(S);
may_use_backends(Host, Rule, From) ->
    acl:match_rule(Host, Rule, From) == allow.

-spec disco_sm_features(empty | {result, [binary()]} | {error, stanza_error()},
                        jid(), jid(), binary(), binary()) ->
          {result, [binary()]} | {error, stanza_error()}.
disco_sm_features(empty, From, To, Node, Lang) ->
    disco_sm_features({result, []}, From, To, Node, Lang);
disco_sm_features({result, Features}, _From, #jid{lserver = S}, <<"">>, _Lang) ->
    {result, python_fact(S, features, [?NS_PUSH_0]) ++ Features};
disco_sm_features(Acc, _From, _To, _Node, _Lang) ->
    Acc.

%% What Python's hello reply told the shim (pymod_push/core/shim_facts.py), kept in the
%% meta table, which outlives a port-owner restart: features, the account's disco#info
%% (XEP-0357's, and Tigase's push extensions, which Siskin IM and Snikket iOS look for, with
%% ios_extensions), and commands, the app server's ad-hoc items on this host ({Node, Name}).
%% Before the first hello: XEP-0357's feature only, and no commands.
python_fact(Host, Name, Default) ->
    try ets:lookup(mod_push_py_port:meta_table(Host), {python_fact, Name}) of
        [{_, Value}] -> Value;
        [] -> Default
    catch error:badarg -> Default  % the module is stopping
    end.

%% disco#info a user sends to their own bare JID: the push options form
%% (urn:xmpp:push:options) with that user's values, which Python keeps in ETS.
%% The same hook runs for the server's disco#info with (Host, Module) instead.
-spec disco_info([xdata()], binary() | jid(), module() | jid(), binary(), binary()) ->
          [xdata()].
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
    Table = mod_push_py_port:options_table(Host),
    try ets:lookup(Table, User) of
        [{_, Fields}] -> Fields;
        [] -> case ets:lookup(Table, default) of
                  [{_, Fields}] -> Fields;
                  [] -> undefined
              end
    catch error:badarg -> undefined  % the port owner is restarting
    end.

bool_text(true) -> <<"1">>;
bool_text(false) -> <<"0">>.

%% Session state keys: push_py (resume timeout to apply while pending) and
%% push_py_saved_timeout (the ordinary one, restored on resume). A UnifiedPush user's
%% session is noted as pending in both clauses (mod_push_py_up:session_pending/1).
-spec c2s_session_pending(c2s_state()) -> c2s_state().
c2s_session_pending(#{push_py := Timeout, mgmt_queue := Queue} = State) ->
    mod_push_py_up:session_pending(session_key(State)),
    Queued = [describe(Pkt, State)
              || {_, _, Pkt} <- p1_queue:to_list(Queue), forwarded(Pkt)],
    notify(State, {session_pending, session_key(State), Queued}),
    Saved = mod_stream_mgmt:get_resume_timeout(State),
    mod_stream_mgmt:set_resume_timeout(State#{push_py_saved_timeout => Saved}, Timeout);
c2s_session_pending(State) ->
    mod_push_py_up:session_pending(session_key(State)),
    State.

-spec c2s_session_resumed(c2s_state()) -> c2s_state().
c2s_session_resumed(#{push_py := _, push_py_saved_timeout := Saved} = State) ->
    notify(State, {session_resumed, session_key(State)}),
    mod_push_py_up:session_resumed(session_key(State), true),
    mod_stream_mgmt:set_resume_timeout(maps:remove(push_py_saved_timeout, State), Saved);
c2s_session_resumed(#{push_py := _} = State) ->
    notify(State, {session_resumed, session_key(State)}),
    mod_push_py_up:session_resumed(session_key(State), true),
    State;
c2s_session_resumed(State) ->  % not push-enabled: a UnifiedPush user's, for their pushes
    mod_push_py_up:session_resumed(session_key(State), false),
    State.

-spec c2s_copy_session(c2s_state(), c2s_state()) -> c2s_state().
c2s_copy_session(State, OldState) ->
    maps:merge(State, maps:with([push_py, push_py_saved_timeout, push_py_nicks,
                                 push_py_roster], OldState)).

-spec c2s_handle_cast(c2s_state(), term()) -> c2s_state() | {stop, c2s_state()}.
c2s_handle_cast(State, {?MODULE, set_push, false}) ->
    {stop, maps:without([push_py, push_py_roster], State)};
c2s_handle_cast(State, {?MODULE, set_push, Timeout}) ->
    {stop, State#{push_py => Timeout}};
%% Roster: whether a registration of the session reads the sender's roster item (Tigase's
%% ignore-unknown filter); without it, stanzas to the session go without that context.
c2s_handle_cast(State, {?MODULE, set_push, false, _Roster}) ->
    {stop, maps:without([push_py, push_py_roster], State)};
c2s_handle_cast(State, {?MODULE, set_push, Timeout, Roster}) ->
    {stop, State#{push_py => Timeout, push_py_roster => Roster}};
c2s_handle_cast(State, _Msg) ->
    State.

%% The hot path: every stanza sent to every session.
-spec c2s_handle_send(c2s_state(), xmpp_element() | xmlel(), term()) -> c2s_state().
c2s_handle_send(#{push_py := _, mgmt_state := pending} = State, Pkt, _Result) ->
    case forwarded(Pkt) of
        true -> notify(State, {stanza, session_key(State), describe(Pkt, State)});
        false -> ok
    end,
    State;
c2s_handle_send(State, _Pkt, _Result) ->
    State.

-spec sm_register_connection_hook(ejabberd_sm:sid(), jid(), ejabberd_sm:info()) -> ok.
sm_register_connection_hook(_SID, #jid{lserver = LServer} = JID, _Info) ->
    send_event(LServer, {session_opened, jid:tolower(JID)}).

-spec offline_message({atom(), message()}) -> {atom(), message()}.
offline_message({Tag, #message{to = #jid{luser = U, lserver = S}} = Msg} = Acc)
  when Tag == offlined; Tag == archived ->
    send_event(S, {offline, {U, S}, described(Msg, U, S)}),
    Acc;
offline_message(Acc) ->
    Acc.

-spec mam_message(message() | drop, binary(), binary(), jid(), binary(), atom(), atom()) ->
          message() | drop.
mam_message(#message{} = Pkt, LUser, LServer, _Peer, _Nick, chat, recv) ->
    case ejabberd_sm:get_user_resources(LUser, LServer) of
        [] -> send_event(LServer, {archived, {LUser, LServer}, described(Pkt, LUser, LServer)});
        _ -> ok  % online or pending sessions are handled by c2s_handle_send
    end,
    Pkt;
%% The user answered or declined a call (XEP-0353) on one device: their devices without a
%% session, which carbons do not reach, learn it from the archive (Python stops those that
%% rang). Only such messages, a scan of the few children of a sent chat message.
mam_message(#message{sub_els = Els} = Pkt, LUser, LServer, _Peer, _Nick, chat, send) ->
    case lists:any(fun call_answer/1, Els) of
        true -> send_event(LServer, {archived, {LUser, LServer}, described(Pkt, LUser, LServer)});
        false -> ok
    end,
    Pkt;
mam_message(Pkt, _LUser, _LServer, _Peer, _Nick, _Type, _Dir) ->
    Pkt.

call_answer(#xmlel{name = Name, attrs = Attrs})
  when Name == <<"proceed">>; Name == <<"accept">>; Name == <<"reject">> ->
    lists:keyfind(<<"xmlns">>, 1, Attrs) == {<<"xmlns">>, <<"urn:xmpp:jingle-message:0">>};
call_answer(_) ->
    false.

-spec mam_message8(message() | drop, binary(), binary(), jid(), binary(), atom(), atom(),
                   boolean()) -> message() | drop.
mam_message8(Pkt, LUser, LServer, Peer, Nick, Type, Dir, _InMucArchive) ->
    mam_message(Pkt, LUser, LServer, Peer, Nick, Type, Dir).

%% Ad-hoc commands of the app server on the server's own host: ejabberd has one
%% handler per namespace (mod_adhoc's), so ours are taken out of the sender's
%% stream here and answered by Python, without making the session wait.
-spec user_send_packet({stanza() | drop, c2s_state()}) ->
          {stanza() | drop, c2s_state()}.
user_send_packet({#iq{type = set,
                      to = #jid{luser = <<>>, lresource = <<>>, lserver = LServer}} = IQ,
                  #{lserver := LServer} = State} = Acc) ->
    try xmpp:get_subtag(IQ, #adhoc_command{}) of
        #adhoc_command{node = Node} ->
            case lists:keymember(Node, 1, python_fact(LServer, commands, [])) of
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
%% UnifiedPush: the available presence Conversations sends to its push server (a host of
%% this server) on every bind: the kept pushes go now.
user_send_packet({#presence{type = available,
                            to = #jid{luser = <<>>, lresource = <<>>, lserver = ToHost}},
                  State} = Acc) ->
    mod_push_py_up:presence(ToHost, session_key(State)),
    Acc;
user_send_packet(Acc) ->
    Acc.

-spec adhoc_local_items(empty | {result, [disco_item()]} | {error, stanza_error()},
                        jid(), jid(), binary()) ->
          empty | {result, [disco_item()]} | {error, stanza_error()}.
adhoc_local_items(Acc, #jid{lserver = FromServer}, #jid{lserver = LServer} = To, _Lang) ->
    %% The push check-up is for the host's own users only.
    case [C || {Node, _} = C <- python_fact(LServer, commands, []),
               Node /= <<"push-diagnose">> orelse FromServer == LServer] of
        [] -> Acc;
        Commands ->
            Items = [#disco_item{jid = To, node = Node, name = Name} || {Node, Name} <- Commands],
            case Acc of
                {result, Old} -> {result, Old ++ Items};
                _ -> {result, Items}
            end
    end.

-spec remove_user(binary(), binary()) -> ok.
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
describe(Pkt, #{jid := #jid{luser = U, lserver = S}} = State) ->  % prepared when bound
    described(Pkt, U, S, maps:get(push_py_roster, State, true));
describe(Pkt, #{user := U, server := S} = State) ->
    described(Pkt, jid:nodeprep(U), jid:nameprep(S), maps:get(push_py_roster, State, true));
describe(Pkt, _State) ->
    describe(Pkt).

%% With ios_extensions, a stanza from someone else carries the sender's roster item,
%% {Subscription, Ask} ({none, none}: none), for the ignore-unknown filter: for a user
%% without a session always, for a session when Python said one of its registrations has
%% the filter (a set_push without that word, from the code before: always).
described(Pkt, U, S) ->
    described(Pkt, U, S, true).

described(#message{type = groupchat} = Pkt, _U, _S, _Roster) ->
    describe(Pkt);
described(Pkt, U, S, Roster) ->
    case xmpp:get_from(Pkt) of
        #jid{luser = U, lserver = S} -> describe(Pkt);  % the user's own (carbons)
        #jid{} = From ->
            case Roster andalso mod_push_py_port:ios_extensions(S)
                andalso roster_item(U, S, From) of
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
-spec xml_binary(xmlel()) -> binary().
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

%% The session's JID as jid:tolower/1 gives it: the bound JID's prepared parts, without
%% stringprep for every stanza.
session_key(#{jid := #jid{luser = U, lserver = S, lresource = R}}) ->
    {U, S, R};
session_key(#{user := U, server := S, resource := R}) ->
    jid:tolower({U, S, R}).

notify(#{lserver := LServer}, Event) ->
    send_event(LServer, Event).
