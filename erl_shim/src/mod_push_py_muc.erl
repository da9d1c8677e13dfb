%%%----------------------------------------------------------------------
%%% mod_push_py_muc: pushes for absent room members (groupchat_pushes). The
%%% muc_filter_message hook finds, for each groupchat message a room of this host
%%% accepts, its affiliated members (member, admin, owner) who are push-enabled (the set
%%% Python keeps here with {groupchat, {users, ...}} actions), have no occupant in the room and are no
%%% MUC/Sub subscribers of its messages, and sends Python one muc_message event with
%%% them. A room without such a member costs no event. Python decides who gets a push.
%%%
%%% The room's #state{} differs between ejabberd releases (23 elements in 23.01 and
%%% 24.12, 25 in 26.x): the few fields needed are read by position after a shape check,
%%% without the hrl, so one beam serves all of them (docs/protocol.md, muc_message).
%%%
%%% Copyright (C) 2026 the pymod_push authors. GPL-2.0-or-later.
%%%----------------------------------------------------------------------
-module(mod_push_py_muc).

-export([start/1, stop/1, muc_filter_message/3, execute/2, users_table/1,
         bookmark_published/6, bookmark_retracted/5]).
%% The XEP-0492 settings are in the members' XEP-0402 bookmarks: a push user's publish or
%% retraction of one is passed on (bookmark events); Python asks for all of a user's once
%% (read_bookmarks), read by a process of its own, never by a room.

-include("xmpp.hrl").
-include("logger.hrl").

-define(SEQ, 100).  % after mod_mam (50), which stamps the stanza id
-define(NS_MUCSUB_MESSAGES, <<"urn:xmpp:mucsub:nodes:messages">>).
-define(MAX_BODY, 4096).  % bytes of the body sent to Python
-define(MAX_XML, 16384).  % a longer stanza goes without its XML (mentions: the body only)
-define(NS_BOOKMARKS, <<"urn:xmpp:bookmarks:1">>).
-define(MAX_BOOKMARKS, 1000).  % items of a user's node read, at most

-spec start(binary()) -> ok.
start(Host) ->
    case mod_push_py_opt:opt(Host, groupchat_pushes) of
        true -> [ejabberd_hooks:add(Hook, Host, ?MODULE, F, Seq) || {Hook, F, Seq} <- hooks()],
                ok;
        false -> ok
    end.

-spec stop(binary()) -> ok.
stop(Host) ->
    [ejabberd_hooks:delete(Hook, Host, ?MODULE, F, Seq) || {Hook, F, Seq} <- hooks()],
    ok.

%% pubsub_delete_item runs from 23.10 on: on 23.01 a retracted bookmark is seen when
%% Python reads the user's bookmarks again (after its restart).
hooks() ->
    [{muc_filter_message, muc_filter_message, ?SEQ},
     {pubsub_publish_item, bookmark_published, 50},
     {pubsub_delete_item, bookmark_retracted, 50}].

%% The push-enabled users (bare {U, S}) of a host: the port owner's (created by the first
%% {groupchat, {users, ...}} action), read by the rooms' processes.
-spec users_table(binary()) -> atom().
users_table(Host) ->
    gen_mod:get_module_proc(Host, mod_push_py_muc_users).

%% Python's {groupchat, Action} actions, executed by the port owner: {users, What, Users}
%% with reset (after each hello: the whole set), add, remove; {read_bookmarks, {U, S}}.
-spec execute(binary(), tuple()) -> ok.
execute(Host, {users, What, Users}) when is_list(Users) ->
    Table = users_table(Host),
    case ets:info(Table, size) of
        undefined -> ets:new(Table, [named_table, set, protected, {read_concurrency, true}]);
        _ -> ok
    end,
    Changed = case What of
                  reset -> ets:delete_all_objects(Table),
                           ets:insert(Table, [{U, true} || U <- Users]);
                  add -> lists:foldl(fun(U, New) -> ets:insert_new(Table, {U, true}) orelse New
                                     end, false, Users);
                  remove -> [ets:delete(Table, U) || U <- Users], true
              end,
    %% The rooms keep their absent members until the version changes (absent/5).
    Changed andalso ets:insert(Table, {version, erlang:unique_integer([monotonic])}),
    ok;
execute(Host, {read_bookmarks, {U, S}}) ->
    _ = spawn(fun() -> read_bookmarks(Host, U, S) end),
    ok.

read_bookmarks(Host, U, S) ->
    Items = case gen_mod:is_loaded(S, mod_pubsub) of
                true ->
                    try mod_pubsub:get_items({U, S, <<>>}, ?NS_BOOKMARKS) of
                        List when is_list(List) -> List;
                        _ -> []  % no such node (no bookmarks), or an error
                    catch _:_ -> []
                    end;
                false -> []
            end,
    Bookmarks = [{Id, payload_xml(element(6, Item))}
                 || Item <- lists:sublist(Items, ?MAX_BOOKMARKS),
                    element(1, Item) =:= pubsub_item,
                    {Id, _} <- [element(2, Item)], is_binary(Id)],
    mod_push_py_port:send_event(Host, {bookmarks, {U, S}, Bookmarks}).

payload_xml([#xmlel{} = El | _]) -> mod_push_py:xml_binary(El);
payload_xml([_ | Rest]) -> payload_xml(Rest);
payload_xml([]) -> <<>>.

%% A push user's bookmark published (the PEP node urn:xmpp:bookmarks:1, item id = room).
-spec bookmark_published(binary(), term(), term(), term(), binary(), term()) -> ok.
bookmark_published(Host, ?NS_BOOKMARKS, _Publisher, Service, ItemId, Payload) ->
    bookmark(Host, Service, ItemId, payload_xml(Payload));
bookmark_published(_Host, _Node, _Publisher, _Service, _ItemId, _Payload) ->
    ok.

-spec bookmark_retracted(binary(), term(), term(), term(), binary()) -> ok.
bookmark_retracted(Host, ?NS_BOOKMARKS, _Publisher, Service, ItemId) ->
    bookmark(Host, Service, ItemId, undefined);
bookmark_retracted(_Host, _Node, _Publisher, _Service, _ItemId) ->
    ok.

bookmark(Host, #jid{luser = U, lserver = S}, ItemId, Xml) when U =/= <<>>, is_binary(ItemId) ->
    try ets:member(users_table(Host), {U, S}) of
        true -> mod_push_py_port:send_event(Host, {bookmark, {U, S}, ItemId, Xml});
        false -> ok
    catch error:badarg -> ok  % no push user yet (no table)
    end;
bookmark(_Host, _Service, _ItemId, _Xml) ->
    ok.

%% Always returns the packet: never drops, never blocks (one ETS read per affiliated
%% member; nothing else unless one of them is push-enabled).
-spec muc_filter_message(message() | term(), term(), binary()) -> message() | term().
muc_filter_message(#message{type = groupchat, body = [_ | _]} = Pkt, RoomState, FromNick) ->
    case xmpp:get_meta(Pkt, mam_ignore, false) of
        true -> ok;  % the subject to a joiner, a moderation (23.10+)
        false ->
            try report(Pkt, RoomState, FromNick)
            catch Class:Reason ->
                    ?WARNING_MSG("mod_push_py: group chat message not looked at: ~p:~P",
                                 [Class, Reason, 10])
            end
    end,
    Pkt;
muc_filter_message(Acc, _RoomState, _FromNick) ->  % no body, private messages, presences
    Acc.

report(Pkt, S, FromNick) when element(1, S) =:= state,
                              (tuple_size(S) =:= 23 orelse tuple_size(S) =:= 25) ->
    Host = element(4, S),
    Table = users_table(Host),
    try ets:lookup_element(Table, version, 2) of
        Version when is_integer(Version) ->
            case absent(Version, element(13, S), element(8, S), element(9, S), Table) of
                [] -> ok;
                Absent -> report(Pkt, S, FromNick, Host, Absent)
            end;
        _ -> ok
    catch error:badarg -> ok  % no push user yet, or Python has not said
    end;
report(_Pkt, _S, _FromNick) ->
    ok.  % a room state of a layout not known to this module: the feature is off for it

%% Affiliated members (not whole domains) who are push-enabled.
candidates(Affiliations, Table) when is_map(Affiliations) ->
    [{U, Server} || {{U, Server, <<>>}, Aff} <- maps:to_list(Affiliations), U =/= <<>>,
                    member(Aff), ets:member(Table, {U, Server})];
candidates(_, _Table) ->
    [].

member({Aff, _Reason}) -> member(Aff);
member(Aff) -> Aff =:= member orelse Aff =:= admin orelse Aff =:= owner.

%% The absent push members, kept in the room process's dictionary with the terms they
%% were computed from: while the affiliations, occupants, subscribers and the push set
%% are the same terms (compared by pointer first), a message costs one ETS read.
absent(Version, Affs, Users, MucSubs, Table) ->
    case get(?MODULE) of
        {Version, Affs, Users, MucSubs, Absent} -> Absent;
        _ ->
            Absent = case candidates(Affs, Table) of
                         [] -> [];
                         Candidates -> absent(Candidates, Users, MucSubs)
                     end,
            put(?MODULE, {Version, Affs, Users, MucSubs, Absent}),
            Absent
    end.

absent(Candidates, Users, MucSubs) ->
    Present = maps:from_list([{{U, Server}, []} || {U, Server, _R} <- maps:keys(Users)]),
    Subscribers = case MucSubs of  % #muc_subscribers{subscribers = #{BareLJID => ...}}
                      _ when is_tuple(MucSubs), tuple_size(MucSubs) >= 2,
                             is_map(element(2, MucSubs)) -> element(2, MucSubs);
                      _ -> #{}
                  end,
    [US || {U, Server} = US <- Candidates, not maps:is_key(US, Present),
           not subscribed(maps:get({U, Server, <<>>}, Subscribers, none))].

report(Pkt, S, FromNick, Host, Absent) ->
    Room = element(6, S),
    Config = element(7, S),
    Flags = #{members_only => element(16, Config) =:= true,
              anonymous => element(21, Config) =:= true},
    mod_push_py_port:send_event(
      Host, {muc_message, jid:encode(jid:remove_resource(Room)), Flags, Absent,
             describe(Pkt, jid:replace_resource(Room, FromNick))}).

%% A MUC/Sub subscriber of the room's messages gets them by the normal path.
subscribed(Subscriber) when is_tuple(Subscriber), tuple_size(Subscriber) >= 4 ->
    is_list(element(4, Subscriber)) andalso lists:member(?NS_MUCSUB_MESSAGES, element(4, Subscriber));
subscribed(_) ->
    false.

%% As mod_push_py's Stanza, from room/nick (never the sender's real JID).
describe(#message{body = Body} = Pkt, From) ->
    Text = cut(xmpp:get_text(Body), ?MAX_BODY),
    Xml = mod_push_py:xml_binary(xmpp:encode(Pkt#message{from = From})),
    {message, jid:encode(From), xmpp:get_id(Pkt), groupchat, Text,
     case byte_size(Xml) > ?MAX_XML of
         true -> <<>>;
         false -> Xml
     end}.

cut(Bin, Max) when byte_size(Bin) =< Max -> Bin;
cut(Bin, Max) -> binary:part(Bin, 0, Max).
